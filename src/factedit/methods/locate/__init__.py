"""The locate-then-edit family: ROME, MEMIT, AlphaEdit and NSE (specs/locate.md).

templates.py (context templates), keys.py (keys k*), values.py and upper.py (target values z*), zstore.py (the z*
store), postnorm.py (mapping through a post-MLP norm), solvers.py, base.py (shared editor machinery and the
sequential state), and one file per editor.
"""

from .alphaedit import AlphaEditConfig, AlphaEditEditor
from .memit import MEMITConfig, MEMITEditor
from .nse import NSEConfig, NSEEditor
from .rome import ROMEConfig, ROMEEditor

__all__ = ["AlphaEditConfig", "AlphaEditEditor", "MEMITConfig", "MEMITEditor", "NSEConfig", "NSEEditor",
           "ROMEConfig", "ROMEEditor"]
