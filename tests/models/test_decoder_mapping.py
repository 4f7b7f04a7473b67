"""S_D's mapping of decoder outputs to teacher layers [read, Dinomaly]: the block outputs, reversed
(the last block reconstructs the shallowest configured layer), are averaged in the teacher's groups.

Uneven groups ([[0], [1, 2, 3]]) make every other mapping visible: no reversal, grouping before
reversing, or a group fed by the wrong blocks each change which outputs a group averages."""

from __future__ import annotations

import torch

from plantad.models.factory import build_model
from plantad.models.teacher import TeacherFeatures
from tiny import tiny_settings

GROUPS = [[0], [1, 2, 3]]  # indices into the 4 configured teacher layers of the tiny model


def tiny_local_model():
    settings = tiny_settings("model.branches=local", f"model.teacher.groups={GROUPS}")
    return build_model(settings).eval()


def replace_block_outputs(decoder, outputs: list[torch.Tensor]) -> list:
    """Forward hooks that make decoder block i return outputs[i] (its handles, to remove)."""
    return [block.register_forward_hook(lambda _m, _inp, _out, o=o: o) for block, o in zip(decoder.blocks, outputs)]


def test_each_group_averages_the_reversed_block_outputs_of_its_layers():
    model = tiny_local_model()
    decoder, prefix_len = model.decoder, model.teacher.num_prefix_tokens
    n_blocks = len(decoder.blocks)
    assert n_blocks == 4
    feats = model.teacher(torch.randn(2, 3, 56, 56))
    tokens = prefix_len + feats.layers[0].shape[1]
    # block i outputs the constant 10**i on its patch tokens, -1 on its class/register tokens
    consts = [torch.full((2, tokens, 64), 10.0**i) for i in range(n_blocks)]
    for c in consts:
        c[:, :prefix_len] = -1.0
    handles = replace_block_outputs(decoder, consts)
    try:
        groups = decoder(feats.layers, feats.prefix)
    finally:
        for h in handles:
            h.remove()
    assert [g.shape[1] for g in groups] == [feats.layers[0].shape[1]] * 2  # prefix tokens dropped
    # teacher layer j is reconstructed by block n-1-j: group [0] <- block 3, group [1, 2, 3] <- blocks 2, 1, 0
    assert torch.allclose(groups[0], torch.full_like(groups[0], 1000.0))
    assert torch.allclose(groups[1], torch.full_like(groups[1], (100.0 + 10.0 + 1.0) / 3))


def test_a_decoder_whose_block_n_minus_1_minus_j_outputs_teacher_layer_j_gives_a_zero_map():
    """Through the model's own eval forward: targets and predictions pair up group by group."""
    model = tiny_local_model()
    x = torch.randn(2, 3, 56, 56)
    feats = model.teacher(x)
    gen = torch.Generator().manual_seed(0)
    layers = [torch.randn(feats.layers[0].shape, generator=gen) for _ in feats.layers]  # distinct layer tokens
    known = TeacherFeatures(layers, feats.prefix, feats.cls, feats.patch_mean, feats.shared)
    teacher_hook = model.teacher.register_forward_hook(lambda *_: known)
    full = [torch.cat([feats.prefix[j], layers[j]], dim=1) for j in range(len(layers))]  # (B, P+N, C)

    def patch_distance(block_outputs: list[torch.Tensor]) -> torch.Tensor:
        handles = replace_block_outputs(model.decoder, block_outputs)
        try:
            return model(x).patch_distance
        finally:
            for h in handles:
                h.remove()

    try:
        matched = patch_distance(full[::-1])  # block i outputs teacher layer n-1-i
        unreversed = patch_distance(full)  # block i outputs teacher layer i
    finally:
        teacher_hook.remove()
    assert matched.abs().max() < 1e-5
    assert unreversed.min() > 0.05  # random layers: a wrong pairing is far from a reconstruction
