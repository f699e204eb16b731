"""The CrossDNA backbone in PyTorch (spec §2), upstream-compatible parameter names, kernels behind ``crossdna.ops``.

Upstream (``crossdna/src/models/CrossDNA/crossdna.py`` + fla) → here:

====================================================  ==============================================
``SSScanDNAHybridModel`` (S-scan, stems, heads, EMA)  :mod:`crossdna.model.hybrid`
``DeepEnhancedBranch`` / ``EnhancedHybridCore``       :mod:`crossdna.model.branch`
fla ``Comba`` layer (+ ``ShortConvolution``,           :mod:`crossdna.model.comba`; kernel ``crossdna.ops.comba``
``FusedRMSNormGated``)
``SlidingWindowAttention`` + fla ``Attention``,        :mod:`crossdna.model.swa`; kernels ``ops.swa``, ``ops.rotary``,
``RMSNorm``, ``GatedMLP``                              ``ops.rms_norm``, ``ops.swiglu``
``TokenBridge``                                        :mod:`crossdna.model.bridge`
``Mlp(return_residual=True)`` as ``proj_A/B``          :class:`crossdna.model.hybrid.ResidualMlp`
constructor kwargs / hydra ``comba_cfg``,              :mod:`crossdna.model.config` (``CrossDNAConfig``, presets,
``transformer_cfg``                                    ``CompatConfig`` defect switches)
``semantic_preservation_loss``, gate supervision,      :mod:`crossdna.objectives`
``metrics.py`` loss and accuracies
====================================================  ==============================================
"""
from .config import AttentionConfig, CombaConfig, CompatConfig, CrossDNAConfig
from .hybrid import MODES, PretrainOutput, SSScanDNAHybridModel, block_groups, count_parameters
from .inputs import validate_input_ids

__all__ = [
    "AttentionConfig",
    "CombaConfig",
    "CompatConfig",
    "CrossDNAConfig",
    "MODES",
    "PretrainOutput",
    "SSScanDNAHybridModel",
    "block_groups",
    "count_parameters",
    "validate_input_ids",
]
