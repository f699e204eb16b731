"""``crossdna export``: a self-contained HuggingFace directory from any model source.

The directory holds ``config.json`` (with ``auto_map``), ``model.safetensors`` (keys ``backbone.*``, the upstream HF
release layout), the tokenizer files and the Python code that runs it. The code is not a second implementation:
the exporter copies the backbone's own source (``crossdna/config.py``, ``crossdna/tokens.py``, ``crossdna/model/``,
``crossdna/ops/``) and the HF wrappers of this package, flattened into one folder (transformers loads remote code
from a flat folder) with package imports rewritten to sibling imports. So the export loads with
``trust_remote_code=True`` and nothing from this project installed, and computes exactly what training computed.

transformers copies a remote module's siblings only when they appear in a ``from .x import y`` line, so every
import is rewritten to that form: a module imported as a module (``from crossdna import ops``) becomes
``from .crossdna_ops import _module as ops``, with ``_module`` defined at the top of every copied module.
"""
from __future__ import annotations

import ast
import json
import re
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

from crossdna import config as _config
from crossdna.model import CrossDNAConfig

PACKAGE_ROOT = Path(__file__).resolve().parents[1]  # .../crossdna
# Source modules that travel with an export (dotted name under crossdna). Packages contribute every module.
_SOURCES = ("config", "tokens", "model", "ops")
# The HF entry points keep their file names: auto_map refers to them.
_ENTRY_POINTS = {"hf.configuration_crossdna": "configuration_crossdna", "hf.modeling_crossdna": "modeling_crossdna",
                 "hf.tokenization_crossdna": "tokenization_crossdna"}
AUTO_MAP = {
    "AutoConfig": "configuration_crossdna.CrossDNAHFConfig",
    "AutoModel": "modeling_crossdna.CrossDNAModel",
    "AutoModelForMaskedLM": "modeling_crossdna.CrossDNAForMaskedLM",
}
TOKENIZER_AUTO_MAP = {"AutoTokenizer": ["tokenization_crossdna.CrossDNATokenizer", None]}

_FROM_IMPORT = re.compile(r"^(?P<indent>[ \t]*)from[ \t]+(?P<mod>\.+[\w.]*|crossdna(?:\.[\w.]+)?)[ \t]+import[ \t]+"
                          r"(?P<names>\([^)]*\)|[^\n#]+)", re.MULTILINE)
_PLAIN_IMPORT = re.compile(r"^[ \t]*import[ \t]+crossdna\b", re.MULTILINE)
_MODULE_LITERAL = re.compile(r"""(["'])crossdna((?:\.\w+)+)\1""")
_FUTURE = re.compile(r"^from __future__ import [^\n]+\n", re.MULTILINE)


def _source_modules() -> dict[str, Path]:
    """Dotted name under crossdna (``model`` for a package's __init__) → file."""
    mods: dict[str, Path] = {}
    for name in _SOURCES:
        path = PACKAGE_ROOT / name
        if path.is_dir():
            for f in sorted(path.glob("*.py")):
                mods[name if f.stem == "__init__" else f"{name}.{f.stem}"] = f
        else:
            mods[name] = path.with_suffix(".py")
    for dotted in _ENTRY_POINTS:
        mods[dotted] = PACKAGE_ROOT / (dotted.replace(".", "/") + ".py")
    return mods


def flat_name(dotted: str) -> str:
    """``model.hybrid`` → ``crossdna_model_hybrid``; the HF entry points keep their own names."""
    return _ENTRY_POINTS.get(dotted) or "crossdna_" + dotted.replace(".", "_")


class _Rewriter:
    def __init__(self, modules: dict[str, Path]):
        self.modules = modules

    def _absolute(self, mod: str, current: str, is_package: bool) -> str:
        """Dotted name under crossdna of an import target written in module ``current``."""
        if not mod.startswith("."):
            return mod[len("crossdna."):] if mod != "crossdna" else ""
        level = len(mod) - len(mod.lstrip("."))
        parts = current.split(".") if current else []
        base = parts if is_package else parts[:-1]
        base = base[:len(base) - (level - 1)] if level > 1 else base
        rest = mod.lstrip(".")
        return ".".join([*base, *([rest] if rest else [])])

    def rewrite(self, text: str, current: str, where: Path) -> str:
        is_package = self.modules[current].name == "__init__.py"
        if _PLAIN_IMPORT.search(text):
            raise ValueError(f"{where}: 'import crossdna…' cannot be exported; use 'from crossdna… import …'")

        def one(m: re.Match) -> str:
            target = self._absolute(m["mod"], current, is_package)
            names = [n.strip() for n in m["names"].strip("() \t\n").split(",") if n.strip()]
            indent = m["indent"]
            if target in self.modules and self.modules[target].name != "__init__.py" or target in _ENTRY_POINTS:
                return f"{indent}from .{flat_name(target)} import {', '.join(names)}"
            lines = []
            for spec in names:
                name, _, alias = spec.partition(" as ")
                name, alias = name.strip(), (alias.strip() or name.strip())
                sub = f"{target}.{name}" if target else name
                if sub in self.modules:  # a module imported as a module
                    lines.append(f"{indent}from .{flat_name(sub)} import _module as {alias}")
                elif target in self.modules:  # a name from a package's __init__
                    lines.append(f"{indent}from .{flat_name(target)} import {spec}")
                else:
                    raise ValueError(f"{where}: import of crossdna.{sub} is not part of the export "
                                     f"(exported: {sorted(self.modules)})")
            return "\n".join(lines)

        text = _FROM_IMPORT.sub(one, text)
        # Dynamic imports by name (the optional fused-kernel module) resolve among the siblings, and a never-run
        # from-import names each such sibling so that transformers copies it along.
        dynamic = sorted({m[2][1:] for m in _MODULE_LITERAL.finditer(text)} & set(self.modules))
        text = _MODULE_LITERAL.sub(lambda m: f'(__package__ + ".{flat_name(m[2][1:])}")', text)
        if dynamic:
            text += ("\n\nfrom typing import TYPE_CHECKING as _TYPE_CHECKING\n\n"
                     "if _TYPE_CHECKING:  # never runs: makes transformers copy these siblings\n"
                     + "".join(f"    from .{flat_name(d)} import _module as _{flat_name(d)}\n" for d in dynamic))
        return text


def _self_reference(text: str) -> str:
    """Insert ``_module = sys.modules[__name__]`` after the docstring / __future__ import."""
    line = "import sys as _sys\n_module = _sys.modules[__name__]  # lets siblings import this module by a from-import\n"
    m = _FUTURE.search(text)
    if m:
        return text[:m.end()] + line + text[m.end():]
    tree = ast.parse(text)
    doc_end = 0
    first = tree.body[0] if tree.body else None
    if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
        doc_end = sum(len(t) for t in text.splitlines(keepends=True)[:first.end_lineno])
    return text[:doc_end] + line + text[doc_end:]


def write_code(out_dir: Path) -> list[str]:
    """Copy and rewrite every source module into ``out_dir``; returns the file names written."""
    modules = _source_modules()
    rewriter = _Rewriter(modules)
    written = []
    for dotted, path in modules.items():
        text = rewriter.rewrite(path.read_text(), dotted, path)
        if dotted not in _ENTRY_POINTS:
            text = _self_reference(text)
        left = re.findall(r"^[ \t]*(?:from|import)[ \t]+crossdna\b.*$", text, re.MULTILINE)
        if left:
            raise ValueError(f"{path}: import(s) left unrewritten: {left}")
        ast.parse(text, filename=flat_name(dotted) + ".py")
        name = flat_name(dotted) + ".py"
        (out_dir / name).write_text(f"# Exported by `crossdna export` from crossdna/{dotted.replace('.', '/')}"
                                    f"{'/__init__' if path.name == '__init__.py' else ''}.py\n" + text)
        written.append(name)
    return written


_MODEL_CARD = """# CrossDNA ({params:,} parameters)

Exported by `crossdna export` from `{source}`. Loads with transformers' remote code; nothing else to install
beyond `torch` and `transformers`.

```python
import torch
from transformers import AutoModelForMaskedLM, AutoTokenizer

tok = AutoTokenizer.from_pretrained("{name}", trust_remote_code=True)
model = AutoModelForMaskedLM.from_pretrained("{name}", trust_remote_code=True).eval()
batch = tok(["ACGTNACGT", "GGCATT"], padding=True, return_tensors="pt")   # ids A0 C1 G2 T3 N4, no -7 needed
with torch.no_grad():
    logits = model(batch["input_ids"]).logits                               # [B, L, 5] over A C G T N
    per_position = model.embed(batch["input_ids"])                          # [B, L, {d}]
    pooled = model.embed_pooled(batch["input_ids"], batch["attention_mask"])  # [B, {d}], pads skipped
```

- Mask token: `{mask}`.
- Pads are N (id 4): the backbone reads them as N (it has no attention mask, like upstream); `embed_pooled` and
  `CrossDNAModel`'s `pooler_output` skip them through `attention_mask`. Padding side: `right` (configurable on the
  tokenizer).
- Kernels: PyTorch reference kernels on CPU; fused GPU kernels on CUDA when the export carries them
  (`backbone.kernels` in `config.json`).
- The representation is the fused, post-LayerNorm feature before the MLM head (upstream `for_representation`).
"""


def export(source: str, out_dir: str | Path, overwrite: bool = False, dtype: torch.dtype = torch.float32) -> Path:
    """Write the HF directory for ``source`` (consolidated weights, HF dir or checkpoint dir). Atomic: the directory
    appears complete or not at all."""
    from crossdna.hf.configuration_crossdna import CrossDNAHFConfig
    from crossdna.hf.modeling_crossdna import CrossDNAForMaskedLM
    from crossdna.hf.tokenization_crossdna import CrossDNATokenizer
    from crossdna.hf.weights import load_state, read_model_source

    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise ValueError(f"{out_dir}: already exists (pass --overwrite to replace it)")
    cfg, state = read_model_source(source)
    # Inference export: no EMA teacher (its copies are training state), kernels chosen at run time.
    cfg = _config.from_dict(CrossDNAConfig, {**_config.to_dict(cfg), "use_ema_teacher": False, "kernels": "auto"})
    hf_cfg = CrossDNAHFConfig(backbone=_config.to_dict(cfg), architectures=["CrossDNAForMaskedLM"])
    hf_cfg.auto_map = dict(AUTO_MAP)
    model = CrossDNAForMaskedLM(hf_cfg)
    load_state(model.backbone, state, str(source))
    model.to(dtype)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}."))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer = CrossDNATokenizer(dedicated_mask=cfg.alphabet_size == 6)
        tokenizer.save_pretrained(tmp)
        tok_cfg_path = tmp / "tokenizer_config.json"
        tok_cfg = json.loads(tok_cfg_path.read_text())
        tok_cfg["auto_map"] = TOKENIZER_AUTO_MAP
        tok_cfg_path.write_text(json.dumps(tok_cfg, indent=2) + "\n")
        write_code(tmp)
        params = sum(p.numel() for p in model.parameters())
        mask = ("[MASK] = id 5 (dedicated)" if cfg.alphabet_size == 6 else
                "[MASK] = N = id 4 (the upstream pretraining convention: the model cannot tell a masked base from N)")
        (tmp / "README.md").write_text(_MODEL_CARD.format(params=params, source=source, name=out_dir.name,
                                                          d=cfg.d_model, mask=mask))
        tmp.chmod(0o755)  # mkdtemp makes it private; an export is meant to be shared
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


PARITY_TOLERANCE = 1e-5
_PROBE_FASTA = PACKAGE_ROOT / "demo" / "data" / "chr20_slices.fa.gz"
# Real chr20 windows: one plain, one running into the centromere gap (N), each longer than a 1024 block.
_PROBES = (("20_31000000_31700000", 200_000, 1_100), ("20_25700000_26400000", 619_000, 1_100))


def probe_ids() -> torch.Tensor:
    """[2, 1100] model ids from the bundled chr20 slices (real sequence, no synthetic DNA)."""
    from crossdna import tokens
    from crossdna.finetune.readers import fasta_records

    records = {header.split()[0]: seq for _, header, seq in fasta_records(_PROBE_FASTA)}
    rows = [tokens.encode(records[name][start:start + length]) for name, start, length in _PROBES]
    return torch.from_numpy(np.stack(rows)).long()


@torch.no_grad()
def parity_check(source: str, export_dir: str | Path, tolerance: float = PARITY_TOLERANCE) -> float:
    """Max |logit difference| between the source model and the export loaded through transformers (CPU, fp32);
    raises ValueError above ``tolerance``."""
    from transformers import AutoModelForMaskedLM

    from crossdna.hf.weights import load_backbone

    ids = probe_ids()
    reference, _ = load_backbone(source, overrides=["use_ema_teacher=false"])
    expected = reference.eval()(ids, mode="logits")
    exported = AutoModelForMaskedLM.from_pretrained(str(export_dir), trust_remote_code=True).eval()
    diff = float((exported(ids).logits - expected).abs().max())
    if not diff <= tolerance:
        raise ValueError(f"{export_dir}: logits differ from {source} by {diff:.3e} > {tolerance:.0e}")
    return diff
