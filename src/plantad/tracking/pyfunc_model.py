"""The pyfunc model's definition, logged as MLflow "models from code".

MLflow runs this file when it loads the model (the shipped `code/` folder is on sys.path), so the
logged model holds no cloudpickled object: loading it executes this reviewed file, never bytes
unpickled from the artifact store.
"""

import mlflow.models

from plantad.tracking.pyfunc import PlantadPyfunc

mlflow.models.set_model(PlantadPyfunc())
