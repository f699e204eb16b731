# Cut the CrossDNA demo/test fixture from GRCh37 chr20 (run from the repository root).
import sys
from sharding.fasta import Fasta

SOURCE = sys.argv[1]  # ../shared/data/human_chr20_grch37/20.fa.gz
REGIONS = [(25_700_000, 26_400_000), (31_000_000, 31_700_000), (44_000_000, 44_600_000)]  # 0-based, half-open
src = Fasta(SOURCE)
with open("crossdna/demo/data/chr20_slices.fa", "w") as out:
    for start, end in REGIONS:
        seq = src.read("20", start, end).tobytes().decode()
        out.write(f">20_{start}_{end} GRCh37 chr20:{start + 1}-{end}\n")
        out.writelines(seq[i:i + 60] + "\n" for i in range(0, len(seq), 60))
