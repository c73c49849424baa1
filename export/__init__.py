"""Export: ONNX fp32/fp16 with TLC, static tiles, deploy folding, TensorRT engines, manifest, lint.

    from export import export_model, verify
    manifest = export_model("NAFNet-GoPro-width32.pth", "exported/", preset="nafnet-gopro-width32",
                            tiles=[(512, 512)], dynamic=True, fp16=True)
    manifest = verify("exported/")            # sha256 of every artifact; raises naming a modified file
    path = manifest.path("onnx-fp16-512x512")

TensorRT is imported only when an engine is built (``trt=True``).
"""

from .api import check_onnx, export_model, prepare_model
from .fold import fold_for_deploy, is_folded
from .formats import FORMATS, Format
from .manifest import Manifest, ManifestError, load_manifest, verify
from .shapes import DEFAULT_PROFILE, DEFAULT_TILE, Profile, ShapeSpec, make_profile, parse_hw, parse_profile
from .trt_plan import TensorRTUnavailable, TrtOptions

__all__ = [
    "export_model", "prepare_model", "check_onnx", "fold_for_deploy", "is_folded",
    "FORMATS", "Format", "Manifest", "ManifestError", "load_manifest", "verify",
    "ShapeSpec", "Profile", "make_profile", "parse_hw", "parse_profile", "DEFAULT_TILE", "DEFAULT_PROFILE",
    "TrtOptions", "TensorRTUnavailable",
]
