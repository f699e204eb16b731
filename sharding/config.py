"""``ShardConfig``: everything that determines the shards (loaded with ``crossdna.config.load``)."""
from __future__ import annotations

import re
from dataclasses import dataclass, field

_SPLIT_NAME = re.compile(r"^[A-Za-z0-9_-]+$")  # split names become directory names


@dataclass
class ShardConfig:
    fasta: str = ""                 # plain or bgzip FASTA (.fai/.gzi built next to it when missing)
    bed: str | None = None          # intervals ``chrom start end label`` (plain or gzip); None = whole contigs
    # BED column 4 -> split, e.g. Borzoi folds {fold3: test, fold4: valid, fold0: train, ...}. Empty: the
    # labels are the split names themselves (the basenji ``train/valid/test`` layout).
    split_labels: dict[str, str] = field(default_factory=dict)
    # Whole-contig mode (no BED): split -> contigs, e.g. {valid: [chr9], test: [chr8]}; every other contig
    # matching ``contig_pattern`` goes to ``default_split``.
    splits: dict[str, list[str]] = field(default_factory=dict)
    default_split: str = "train"
    contig_pattern: str = ".*"      # whole-contig mode: contigs used (full match), e.g. ^chr([0-9]+|X|Y)$
    merge_overlaps: bool = True     # BED mode: merge overlapping intervals of a split (no redundant windows)
    window_length: int = 1024
    stride: int | None = None       # None = window_length (adjacent, non-overlapping windows)
    max_n_fraction: float = 0.1     # windows with more N (over their real bases) are dropped and counted
    min_tail: int = 128             # a contig/interval end shorter than this is dropped; longer: N-padded to L
    samples_per_shard: int = 4096
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.fasta:
            raise ValueError("fasta: path to the FASTA is required")
        if self.window_length < 1:
            raise ValueError(f"window_length: must be >= 1, got {self.window_length}")
        if self.stride is None:
            self.stride = self.window_length
        if self.stride < 1:
            raise ValueError(f"stride: must be >= 1, got {self.stride}")
        if not 0.0 <= self.max_n_fraction <= 1.0:
            raise ValueError(f"max_n_fraction: must be in [0, 1], got {self.max_n_fraction}")
        if not 1 <= self.min_tail <= self.window_length:
            raise ValueError(f"min_tail: must be in [1, window_length={self.window_length}], got {self.min_tail}")
        if self.samples_per_shard < 1:
            raise ValueError(f"samples_per_shard: must be >= 1, got {self.samples_per_shard}")
        try:
            re.compile(self.contig_pattern)
        except re.error as e:
            raise ValueError(f"contig_pattern: invalid regular expression: {e}") from e
        names = [self.default_split, *self.splits, *self.split_labels.values()]
        for name in names:
            if not _SPLIT_NAME.match(name):
                raise ValueError(f"split name {name!r}: use letters, digits, '_' or '-' (it names a directory)")
        seen: dict[str, str] = {}
        for split, contigs in self.splits.items():
            for contig in contigs:
                if contig in seen:
                    raise ValueError(f"splits.{split}: contig {contig!r} is already in split {seen[contig]!r}")
                seen[contig] = split
        if self.bed is not None and self.splits:
            raise ValueError("splits: whole-contig splits and a BED are exclusive (the BED's column 4 splits)")

    def identity(self) -> dict:
        """The parameters that determine the output (paths excluded: the inputs are identified by sha256)."""
        from crossdna.config import to_dict
        d = to_dict(self)
        d.pop("fasta")
        d.pop("bed")
        return d
