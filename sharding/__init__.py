"""Offline sharder: FASTA (+ BED) -> globally shuffled, checksummed WebDataset tar shards + ``manifest.json``.

Pipeline (docs/sharding.md): plan regions and tasks (``regions``) -> extract windows per task into spill files
(``extract``, parallel, resumable) -> permute every split with a seeded permutation and write equal-count tar
shards (``write``) -> ``manifest.json``. ``build.build_shards`` runs all of it; on Slurm an array job runs the
extraction in parts and ``build.merge`` does the rest.
"""
FORMAT_VERSION = 1        # the on-disk shard + manifest contract read by crossdna.data
SHARDER_VERSION = "1.0.0"  # bump when the same inputs and parameters would give different shards
