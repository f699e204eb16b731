"""``crossdna info``: versions, devices and the parameter count of a model preset."""
from __future__ import annotations

import argparse
import json
import platform

from crossdna.versions import installed_version


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="print versions, devices and model parameter counts")
    p.add_argument("--preset", default="8m", help="model preset to count (default: 8m)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from crossdna import __version__
    from crossdna.model import CrossDNAConfig, SSScanDNAHybridModel, count_parameters

    cfg = CrossDNAConfig.preset(args.preset)
    with torch.device("meta"):
        model = SSScanDNAHybridModel(cfg)
    counts = count_parameters(model)
    info = {
        "crossdna": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": installed_version("triton"),
        "fla-core": installed_version("fla-core"),
        "deepspeed": installed_version("deepspeed"),
        "mlflow": installed_version("mlflow") or installed_version("mlflow-skinny"),
        "cuda_available": torch.cuda.is_available(),
        "devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
        "preset": args.preset,
        "parameters": counts,
    }
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        for k, v in info.items():
            print(f"{k:>15}: {v}")
    return 0
