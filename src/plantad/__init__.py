"""plantad: visual anomaly detection for factory images, from DVC-versioned data to Ray Serve."""

__version__ = "0.1.0"
