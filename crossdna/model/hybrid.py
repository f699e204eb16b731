"""``SSScanDNAHybridModel``: two strand branches, the S-scan over blocks, TokenBridge, gated fusion, MLM head, and
the EMA teacher (spec §2, §3.3). Parameter and buffer names are upstream's, so upstream checkpoints load strictly.

Blocks of ``block_size`` tokens are independent (RoPE positions, Comba state and the bridge's global token restart
per block), so all full blocks run as one batch [B·K, l, d]; a shorter last block is a second batch. Even blocks
feed the forward strand to branch A and the reverse complement to branch B; odd blocks swap them (the "rotating
input"). With L ≤ block_size (pretraining, NT) there is one block and no swap.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from crossdna.tokens import COMPLEMENT_PERMUTATION, NUM_BASES

from .branch import DeepEnhancedBranch
from .bridge import TokenBridge
from .config import CrossDNAConfig
from .inputs import check_input_ids, complement_table, reverse_complement, validate_input_ids

MODES = ("logits", "representation", "pretrain")
EMA_PAIRS = (("branchA_core_ema", "branchA_core"), ("branchB_core_ema", "branchB_core"), ("bridge_ema", "bridge"))
UPSTREAM_COMPLEMENT_PERMUTATION = (3, 0, 2, 1, 4)  # defect 6: A→T, C→A, G→G, T→C


@dataclass
class PretrainOutput:
    """Everything ``crossdna.objectives.pretrain_loss`` needs. Shapes in forward coordinates, [B, L, ...]."""

    logits: torch.Tensor                 # [B,L,5] fused MLM logits
    fa: torch.Tensor                     # [B,L,d] student branch-A features after proj_A (with grad)
    fb: torch.Tensor                     # [B,L,d] student branch-B features after proj_B
    gate_logits: torch.Tensor | None     # [B,L,d] gate_fuse output; None while the gate is frozen (no grad path)
    target_a: torch.Tensor | None        # [B,L,d] teacher targets for fa (no grad); None without a teacher
    target_b: torch.Tensor | None
    logits_a: torch.Tensor               # [B,L,5] out_linear(fa), computed under no_grad (metrics only)
    logits_b: torch.Tensor
    a_is_rc: torch.Tensor                # [L] bool: branch A read the reverse complement here (odd blocks)
    block_size: int
    gate_freeze_steps: int
    gate_temp: float
    gate_frozen: bool                    # the forward mixed FA and FB 50/50 (training warm-up)


class _Group(NamedTuple):
    """``count`` consecutive blocks of ``length`` tokens starting at forward position ``start`` (block ``first``)."""

    start: int
    count: int
    length: int
    first: int

    @property
    def end(self) -> int:
        return self.start + self.count * self.length


def block_groups(length: int, block_size: int) -> list[_Group]:
    full, tail = divmod(length, block_size)
    groups = [_Group(0, full, block_size, 0)] if full else []
    if tail:
        groups.append(_Group(full * block_size, 1, tail, full))
    return groups


class _Scan(NamedTuple):
    fused: torch.Tensor
    fa: torch.Tensor
    fb: torch.Tensor
    gate_logits: torch.Tensor | None


class ResidualMlp(nn.Module):
    """upstream ``Mlp(d, 2d, d, gelu, return_residual=True)`` with the caller's residual folded in."""

    def __init__(self, d_model: int, hidden: int):
        super().__init__()
        self.linear1 = nn.Linear(d_model, hidden)
        self.linear2 = nn.Linear(hidden, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear2(F.gelu(self.linear1(x))) + x


class SSScanDNAHybridModel(nn.Module):
    def __init__(self, cfg: CrossDNAConfig | None = None):
        super().__init__()
        cfg = cfg or CrossDNAConfig()
        self.cfg = cfg
        d = cfg.d_model
        # Registration order follows upstream, so state_dict() lists keys in upstream's order.
        self.register_buffer("g_step", torch.zeros(1, dtype=torch.long))
        self.linear = nn.Conv1d(cfg.alphabet_size, d, cfg.stem_kernel, padding=cfg.stem_kernel // 2)
        self.rc_linear = nn.Conv1d(cfg.alphabet_size, d, cfg.stem_kernel, padding=cfg.stem_kernel // 2)
        self.branchA_core = DeepEnhancedBranch(cfg)
        self.branchB_core = DeepEnhancedBranch(cfg)
        self.bridge = TokenBridge(d, cfg.bridge_dropout) if cfg.use_bridge else None
        if cfg.use_ema_teacher:
            self.branchA_core_ema = DeepEnhancedBranch(cfg)
            self.branchB_core_ema = DeepEnhancedBranch(cfg)
            self.bridge_ema = TokenBridge(d, cfg.bridge_dropout) if cfg.use_bridge else None
            for module in self.ema_modules():
                module.requires_grad_(False)
                module.train(False)
        self.proj_A = ResidualMlp(d, 2 * d)
        self.proj_B = ResidualMlp(d, 2 * d)
        self.gate_fuse = nn.Linear(2 * d, d)
        self.out_linear = nn.Linear(d, NUM_BASES)
        self.dropout = nn.Dropout(cfg.dropout)
        self.register_buffer("P_comp", torch.zeros(NUM_BASES, NUM_BASES))
        self.register_buffer("id_complement", torch.zeros(cfg.alphabet_size, dtype=torch.long), persistent=False)
        # Host mirrors of g_step: the forward reads these, never the buffer (no device sync). The forward only
        # depends on the bool, so torch.compile guards on one flip instead of recompiling for every step value.
        self._step = 0
        self._warming_up = cfg.gate_freeze_steps > 0
        # On a GPU, run the teacher's passes on a second CUDA stream beside the student's forward (they only meet
        # at the loss): kernels of one that leave SMs idle (latency-bound, short grids) can overlap the other's.
        self.overlap_teacher = False
        self._teacher_streams: dict[torch.device, torch.cuda.Stream] = {}
        self.register_load_state_dict_post_hook(SSScanDNAHybridModel._after_load)
        self._reset_buffers()
        self.copy_student_to_ema()

    # ----------------------------------------------------------------------------------------------- parameters
    def ema_modules(self) -> list[nn.Module]:
        if not self.cfg.use_ema_teacher:
            return []
        return [m for m in (getattr(self, name) for name, _ in EMA_PAIRS) if m is not None]

    def _ema_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        if not self.cfg.use_ema_teacher:
            return []
        pairs = [(getattr(self, e), getattr(self, s)) for e, s in EMA_PAIRS]
        return [(e, s) for e, s in pairs if e is not None]

    def named_student_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """Parameters the optimizer owns (the EMA copies are excluded: defect 30)."""
        ema_prefixes = tuple(f"{name}." for name, _ in EMA_PAIRS)
        for name, param in self.named_parameters():
            if not name.startswith(ema_prefixes):
                yield name, param

    def student_parameters(self) -> Iterator[nn.Parameter]:
        for _, param in self.named_student_parameters():
            yield param

    def ema_parameters(self) -> Iterator[nn.Parameter]:
        for module in self.ema_modules():
            yield from module.parameters()

    def train(self, mode: bool = True) -> "SSScanDNAHybridModel":
        """The EMA teacher always runs with eval semantics (no dropout), whatever the student's mode."""
        super().train(mode)
        for module in self.ema_modules():
            module.train(False)
        return self

    @torch.no_grad()
    def copy_student_to_ema(self) -> None:
        for ema, student in self._ema_pairs():
            torch._foreach_copy_(list(ema.parameters()), list(student.parameters()))

    @torch.no_grad()
    def update_ema(self) -> None:
        """p_ema ← decay·p_ema + (1 − decay)·p, one fused foreach call. Call after each optimizer step (defect 9)."""
        ema, student = [], []
        for e, s in self._ema_pairs():
            ema.extend(e.parameters())
            student.extend(s.parameters())
        if ema:
            torch._foreach_lerp_(ema, student, 1.0 - self.cfg.ema_decay)

    @torch.no_grad()
    def init_weights(self) -> None:
        """Re-initialise everything as at construction (for meta-device construction followed by ``to_empty``)."""
        for module in self.modules():
            if module is not self and hasattr(module, "reset_parameters"):
                module.reset_parameters()
        self._reset_buffers()
        self.copy_student_to_ema()

    # ------------------------------------------------------------------------------------------------------ step
    def set_step(self, step: int) -> None:
        """Record the optimizer step (drives the gate freeze). Writes the ``g_step`` buffer without a host sync."""
        self._set_host_step(int(step))
        self.g_step.fill_(self._step)

    def _set_host_step(self, step: int) -> None:
        self._step = step
        self._warming_up = step < self.cfg.gate_freeze_steps

    @property
    def step(self) -> int:
        return self._step

    def gate_frozen(self) -> bool:
        """Gate fixed at 0.5: a training warm-up (upstream also froze it in eval, defect 8)."""
        return self._warming_up and (self.training or self.cfg.compat.gate_freeze_in_eval)

    @torch.no_grad()
    def _reset_buffers(self) -> None:
        if self.g_step.is_meta:
            return
        self.g_step.zero_()
        self._set_host_step(0)
        self._fill_complements()

    @torch.no_grad()
    def _fill_complements(self) -> None:
        perm = COMPLEMENT_PERMUTATION if self.cfg.compat.complement_permutation == "correct" else UPSTREAM_COMPLEMENT_PERMUTATION
        perm_t = torch.tensor(perm, dtype=torch.long)
        self.P_comp.copy_(F.one_hot(perm_t, NUM_BASES).to(self.P_comp.dtype))
        self.id_complement.copy_(complement_table(self.cfg.alphabet_size))

    @torch.no_grad()
    def sync_buffers_after_load(self) -> None:
        """Derive what a state dict does not carry: the host copy of ``g_step`` (read once) and the complement
        tables (they follow this model's config, not the file's P_comp). Runs as a load hook; loaders that bypass
        ``load_state_dict`` (transformers' meta-device loading) call it themselves."""
        if not self.g_step.is_meta:
            self._set_host_step(int(self.g_step))
            self._fill_complements()

    @staticmethod
    def _after_load(module: "SSScanDNAHybridModel", incompatible_keys) -> None:
        module.sync_buffers_after_load()

    # ---------------------------------------------------------------------------------------------------- forward
    def validate_inputs(self, input_ids: torch.Tensor) -> None:
        """Full input check including the id range (one host sync): call it at the data/CLI boundary."""
        validate_input_ids(input_ids, self.cfg.alphabet_size)

    def _stem(self, conv: nn.Conv1d, ids: torch.Tensor) -> torch.Tensor:
        """GELU(Conv1d_k9(one_hot(ids))) [B,L,d], before dropout (the teacher reuses it as is)."""
        onehot = F.one_hot(ids, self.cfg.alphabet_size).to(conv.weight.dtype).transpose(1, 2)
        return F.gelu(conv(onehot)).transpose(1, 2)

    def _blocks(self, x: torch.Tensor, g: _Group) -> torch.Tensor:
        """Forward-strand blocks of group g as [B·count, length, d]."""
        return x[:, g.start:g.end].reshape(-1, g.length, x.shape[-1])

    def _rc_blocks(self, x_rc: torch.Tensor, g: _Group) -> torch.Tensor:
        """RC-strand blocks (in RC reading order) paired with the forward blocks of group g."""
        L, d = x_rc.shape[1], x_rc.shape[-1]
        if self.cfg.compat.rc_alignment == "upstream":
            # Defect 1: rc_feat[:, s:e] is the RC of forward [L−e, L−s), the mirror block.
            return x_rc[:, g.start:g.end].reshape(-1, g.length, d)
        # The RC of forward [s, e) is rc_feat[:, L−e:L−s]; within the group's RC span the block order is reversed.
        span = x_rc[:, L - g.end:L - g.start].reshape(x_rc.shape[0], g.count, g.length, d)
        return span.flip(1).reshape(-1, g.length, d)

    @staticmethod
    def _per_block(g: _Group, odd: torch.Tensor | None, even_rows: torch.Tensor, odd_rows: torch.Tensor) -> torch.Tensor:
        """Pick rows by block parity; the common all-even case (one block) costs nothing."""
        if g.count == 1:
            return odd_rows if g.first % 2 else even_rows
        return torch.where(odd, odd_rows, even_rows)

    def _parity(self, g: _Group, batch: int, device: torch.device) -> torch.Tensor | None:
        if g.count == 1:
            return None
        odd = (torch.arange(g.first, g.first + g.count, device=device) % 2).bool()
        return odd.repeat(batch).view(-1, 1, 1)

    def _scan(self, g: _Group, fwd: torch.Tensor, rc: torch.Tensor, odd, frozen: bool) -> _Scan:
        """Student pass over the blocks of one group (rows [B·count, length, d])."""
        backend = self.cfg.kernels
        x_a = self._per_block(g, odd, fwd, rc)
        x_b = self._per_block(g, odd, rc, fwd)
        h_a = self.branchA_core(x_a, backend)
        h_b = self.branchB_core(x_b, backend)
        # Whichever branch read the RC strand is flipped back to forward coordinates.
        h_a = self._per_block(g, odd, h_a, h_a.flip(1))
        h_b = self._per_block(g, odd, h_b.flip(1), h_b)
        if self.bridge is not None:
            h_a, h_b = self.bridge(h_a, h_b, backend)
        return _Scan(*self._fuse(h_a, h_b, frozen))

    def _fuse(self, h_a: torch.Tensor, h_b: torch.Tensor, frozen: bool):
        """The branches' heads and their gated mix: (layer-normed mix, fa, fb, gate logits or None).

        One function so that :func:`crossdna.model.compile.compile_model` compiles it as one graph: eager, the
        mix and its fp32 LayerNorm are half a dozen passes over [B, L, d] each way."""
        fa, fb = self.proj_A(h_a), self.proj_B(h_b)
        if frozen:
            gate_logits = None
            mix = 0.5 * fa + 0.5 * fb  # gate_fuse gets no gradient while frozen, as upstream
        else:
            gate_logits = self.gate_fuse(torch.cat([fa, fb], dim=-1))
            gate = torch.sigmoid(gate_logits / self.cfg.gate_temp)
            mix = gate * fa + (1 - gate) * fb
        return F.layer_norm(mix, mix.shape[-1:]), fa, fb, gate_logits

    def _teacher_stream(self, device: torch.device) -> torch.cuda.Stream | None:
        if not self.overlap_teacher or device.type != "cuda":
            return None
        if device not in self._teacher_streams:
            self._teacher_streams[device] = torch.cuda.Stream(device)
        return self._teacher_streams[device]

    def _teacher_context(self):
        if self.cfg.use_ema_teacher:
            return contextlib.nullcontext()  # the EMA modules are always in eval mode
        return _eval_mode(self.branchA_core, self.branchB_core, *([self.bridge] if self.bridge is not None else []))

    @torch.no_grad()
    def _teacher(self, g: _Group, fwd: torch.Tensor, rc: torch.Tensor, odd) -> tuple[torch.Tensor, torch.Tensor]:
        """Targets for fa, fb: both teacher branches on each strand, batched as [2N] (upstream did 4 + 2 passes).

        R⁺ = bridge(brA(fwd), brB(fwd)); R⁻ = bridge(flip(brA(rc)), flip(brB(rc))); A's target is R⁻_A where A read
        the RC strand (odd blocks), else R⁺_A; B's target is R⁻_B where B read the RC strand (even blocks).
        """
        ema = self.cfg.use_ema_teacher
        branch_a = self.branchA_core_ema if ema else self.branchA_core
        branch_b = self.branchB_core_ema if ema else self.branchB_core
        bridge = self.bridge_ema if ema else self.bridge
        backend = self.cfg.kernels
        n = fwd.shape[0]
        both = torch.cat([fwd, rc], dim=0)
        with self._teacher_context():
            t_a, t_b = branch_a(both, backend), branch_b(both, backend)
            t_a = torch.cat([t_a[:n], t_a[n:].flip(1)], dim=0)
            t_b = torch.cat([t_b[:n], t_b[n:].flip(1)], dim=0)
            if bridge is not None:
                t_a, t_b = bridge(t_a, t_b, backend)
        plus_a, minus_a = t_a[:n], t_a[n:]
        plus_b, minus_b = t_b[:n], t_b[n:]
        return self._per_block(g, odd, plus_a, minus_a), self._per_block(g, odd, minus_b, plus_b)

    def forward(self, input_ids: torch.Tensor, mode: str = "logits"):
        """``logits`` → [B,L,5]; ``representation`` → fused hidden states [B,L,d] (upstream ``for_representation``);
        ``pretrain`` → :class:`PretrainOutput` (adds per-branch features, gate logits, teacher targets)."""
        cfg = self.cfg
        if mode not in MODES:
            raise ValueError(f"mode={mode!r} is not one of {list(MODES)}")
        check_input_ids(input_ids, cfg.alphabet_size)
        if input_ids.device.type == "cpu":  # the range check is free of device syncs here
            validate_input_ids(input_ids, cfg.alphabet_size)
        frozen = self.gate_frozen()
        if self.training and cfg.compat.gate_step == "forward_count":
            self.g_step += 1  # defect 8 (upstream): every training forward counts; read before the increment
            self._set_host_step(self._step + 1)

        B, L = input_ids.shape
        clean = self._stem(self.linear, input_ids)
        clean_rc = self._stem(self.rc_linear, reverse_complement(input_ids, self.id_complement))
        feat, rc_feat = self.dropout(clean), self.dropout(clean_rc)
        want_teacher = mode == "pretrain"

        scans, targets = [], []
        groups = block_groups(L, cfg.block_size)
        odds = [self._parity(g, B, input_ids.device) for g in groups]
        side = self._teacher_stream(input_ids.device) if want_teacher else None
        if side is not None:  # the teacher waits for the stems and the parities only, not for the student's passes
            side.wait_stream(torch.cuda.current_stream(input_ids.device))
        for g, odd in zip(groups, odds):
            scans.append(self._scan(g, self._blocks(feat, g), self._rc_blocks(rc_feat, g), odd, frozen))
            if want_teacher:
                with contextlib.nullcontext() if side is None else torch.cuda.stream(side):
                    targets.append(self._teacher(g, self._blocks(clean, g), self._rc_blocks(clean_rc, g), odd))
        if side is not None:
            # Join before anything the teacher read can be freed (clean, clean_rc, odd live until here); the
            # targets, allocated on the side stream, are then also in use on this one.
            main = torch.cuda.current_stream(input_ids.device)
            main.wait_stream(side)
            for target in (t for pair in targets for t in pair):
                target.record_stream(main)

        def merge(parts: list[torch.Tensor]) -> torch.Tensor:
            parts = [p.reshape(B, -1, p.shape[-1]) for p in parts]
            return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)

        fused = merge([s.fused for s in scans])
        if self.training and cfg.compat.ema_update_in_forward:
            self.update_ema()  # defect 9 (upstream): before this step's optimizer update
        if mode == "representation":
            return fused
        logits = self.out_linear(fused)
        if mode == "logits":
            return logits
        fa, fb = merge([s.fa for s in scans]), merge([s.fb for s in scans])
        with torch.no_grad():
            logits_a, logits_b = self.out_linear(fa), self.out_linear(fb)
        a_is_rc = (torch.arange(L, device=input_ids.device) // cfg.block_size % 2).bool()
        return PretrainOutput(
            logits=logits,
            fa=fa,
            fb=fb,
            gate_logits=None if frozen else merge([s.gate_logits for s in scans]),
            target_a=merge([t[0] for t in targets]) if targets else None,
            target_b=merge([t[1] for t in targets]) if targets else None,
            logits_a=logits_a,
            logits_b=logits_b,
            a_is_rc=a_is_rc,
            block_size=cfg.block_size,
            gate_freeze_steps=cfg.gate_freeze_steps,
            gate_temp=cfg.gate_temp,
            gate_frozen=frozen,
        )


@contextlib.contextmanager
def _eval_mode(*modules: nn.Module):
    """Teacher passes through student modules (``use_ema_teacher=False``) run without dropout."""
    states = [m.training for m in modules]
    try:
        for m in modules:
            m.train(False)
        yield
    finally:
        for m, state in zip(modules, states):
            m.train(state)


def count_parameters(model: SSScanDNAHybridModel) -> dict[str, int]:
    """{"trainable": student parameters, "ema": teacher copies, "total": both} (works on the meta device)."""
    trainable = sum(p.numel() for p in model.student_parameters())
    ema = sum(p.numel() for p in model.ema_parameters())
    return {"trainable": trainable, "ema": ema, "total": trainable + ema}
