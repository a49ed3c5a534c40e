"""kdgraph: knowledge distillation for PyTorch, with layers named in a spec and tapped through torch.fx."""
from .distiller import Distiller
from .graph import layers, tap

__version__ = "0.1.0"
__all__ = ["Distiller", "layers", "tap", "__version__"]
