"""The `.edgert` artifact format, shared by the compiler (writing) and the runtime (reading).

`format`: version, member names, hashing, the typed `Manifest`; `tensorfile`: the aligned
safetensors weights file; `reader`: opening and verifying; `writer`: atomic writing.
"""

from edgert.artifact.format import FORMAT_VERSION, Manifest
from edgert.artifact.reader import Artifact, check_target, open_artifact

__all__ = ["FORMAT_VERSION", "Artifact", "Manifest", "check_target", "open_artifact"]
