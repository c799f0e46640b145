"""Activation dumps on disk: sharded safetensors files, a JSON index, and a lazy reader.

A dump folder (`fgscope dump ... --out DIR`):

    dump.json                                what the dump is: its identity (model, inputs,
                                             layers, pooling, dtypes, shard size, parts), hash,
                                             stored layers and versions; written first
    inputs.json                              every input path in input order, labels, classes
    shards/PPPPP-of-NNNNN-SSSSSS.safetensors shard S of part P of N: one tensor per layer,
                                             `(rows, *shape)`, rows in input order, plus
                                             `__input_index__` (int64 input index per row)
    parts/PPPPP-of-NNNNN/progress.json       part P's completed shards and failures
    parts/PPPPP-of-NNNNN/files/SSSSSS.json   what each input file of shard S was (size,
                                             mtime, ctime, inode, sha256): checked on resume
    parts/PPPPP-of-NNNNN/manifest.json       how part P was run (argv, device, timings)
    index.json                               the union of all parts, written once all are
                                             complete: layers, shards with their row
                                             ranges, paths, labels, failures, manifest
    manifest.json                            the parts' manifests together

Every file is written atomically (a temporary file in the same folder, then a rename), so an
interrupted run (Ctrl-C, kill -9, a full disk) never leaves a half-written file under its
final name, and every shard listed in a progress file is complete. Files are not fsynced
(a crash of the process cannot damage them; after a power loss, `fgscope dump-merge --verify`
checks every shard against the sha256 recorded when it was written). `index.json` holds no
timestamps: the same data gives the same bytes, whether the run was interrupted or not.
While a process writes a part it holds a `flock` on `.fgscope-lock-PPPPP-of-NNNNN` (a second
dump of that part is refused; a killed one's lock is taken over).

Shards are plain safetensors files, byte for byte what `safetensors.torch.save` writes (but
streamed from the tensors' memory, without a serialised copy), readable with `safetensors`,
with `torch`, or with numpy alone (docs/dump.md). `open(DIR)` gives a per-layer, lazily
loaded view across all shards; the first read of each shard checks its sha256.
"""

from __future__ import annotations

# The package is four modules:
#   format  the records, names and small files (dump.json, inputs.json, progress)
#   writer  writing shards (write_shard) and the background ShardWriter; locks
#   index   a part's resume point and checks (load_part, find_input_change, check_shard),
#           the union index (build_index, write_index)
#   reader  open(DIR): the lazy, verified reader
# Tests that inject faults patch `fgscope.store.writer._write_chunks`, where it is called.
from fgscope.store.format import (
    DUMP_FILES,
    FORMAT,
    INPUT_INDEX,
    VERSION,
    Failure,
    FileFingerprint,
    PartState,
    PendingShard,
    ShardRecord,
    StoredLayer,
    file_fingerprint,
    files_name,
    identity_hash,
    part_tag,
    read_identity,
    read_inputs,
    remove_dump,
    shard_name,
    split_inputs,
    write_identity,
    write_inputs,
    write_progress,
)
from fgscope.store.index import (
    InputChange,
    build_index,
    check_shard,
    find_input_change,
    load_part,
    write_index,
)
from fgscope.store.reader import Dump, LayerView, open
from fgscope.store.writer import (
    DumpLock,
    ShardWriter,
    folder_lock,
    other_part_locks,
    part_lock,
    write_shard,
)

__all__ = [
    "FORMAT",
    "VERSION",
    "INPUT_INDEX",
    "StoredLayer",
    "Failure",
    "ShardRecord",
    "PartState",
    "PendingShard",
    "ShardWriter",
    "Dump",
    "LayerView",
    "open",
    "part_tag",
    "shard_name",
    "split_inputs",
    "identity_hash",
    "read_identity",
    "write_identity",
    "read_inputs",
    "write_inputs",
    "load_part",
    "write_progress",
    "write_shard",
    "files_name",
    "FileFingerprint",
    "file_fingerprint",
    "InputChange",
    "find_input_change",
    "check_shard",
    "DumpLock",
    "part_lock",
    "folder_lock",
    "other_part_locks",
    "build_index",
    "write_index",
    "remove_dump",
    "DUMP_FILES",
]
