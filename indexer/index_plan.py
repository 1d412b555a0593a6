"""Which index fits a memory budget: `imgsim index --max-index-memory 4G`.

The rules are autofaiss's (``get_optimal_index_keys_v2``, ``get_optimal_quantization``):
an uncompressed graph (HNSW) when it fits, otherwise IVF-PQ with the longest codes that fit,
an HNSW coarse quantizer past a thousand lists. One departure: about sqrt(n) lists where
autofaiss takes 4 sqrt(n) (16k-64k past a million vectors). Training k-means costs lists x
training points, both proportional to the list count, so 4x the lists is 16x the training
time: hours instead of minutes for 10M vectors on a small machine; probing more lists per
query wins the recall back (docs/large_index.md measures it). They are re-stated here rather than imported
because autofaiss 2.18 requires numpy<2, while TensorFlow (ml-dtypes) requires numpy>=2:
installing it beside TensorFlow downgrades numpy and breaks TensorFlow. The estimate counts
what stays in RAM; the exact float16 vectors of a compressed index are on disk,
memory-mapped (:mod:`indexer.vector_file`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from pydantic import ByteSize, TypeAdapter, ValidationError

from models.errors import BadInput

PQ_BYTES = (256, 128, 64, 32, 16, 8)  # code bytes per vector, best first; each divides the usual dims
PQ_DEFAULT = 64  # an ivfpq index without a budget
NPROBE = 64  # lists probed per query
RERANK = 40  # candidates per result re-ranked by their exact vectors (docs/large_index.md)
ID_BYTES = 8  # an IVF list stores each vector's 64-bit id beside its code
HNSW_M = 32
FLAT_BELOW = 1_000  # vectors: an exact search is as fast as any index (autofaiss' flat_threshold)
QUANTIZE_FROM = 10_000  # vectors: fewer do not train a quantizer well (autofaiss' quantization_threshold)
HNSW_QUANTIZER_FROM = 1_000  # lists: from here the list centroids are searched with a small HNSW graph


@dataclass(frozen=True)
class Plan:
    index_type: str
    params: dict[str, int]
    ram_bytes: int

    def describe(self) -> str:
        knobs = ", ".join(f"{k}={v}" for k, v in self.params.items())
        return f"{self.index_type} ({knobs}): about {_human(self.ram_bytes)} in RAM"


def parse_bytes(text: str) -> int:
    """'4G', '500MB', '2GiB' -> bytes (pydantic's ByteSize rules)."""
    try:
        return int(TypeAdapter(ByteSize).validate_python(text))
    except ValidationError:
        raise BadInput(f"not a memory size: {text!r} (examples: 500M, 4G, 2GiB)") from None


def n_lists(n: int) -> int:
    """Inverted lists for n vectors: the power of two nearest sqrt(n)."""
    return max(1, 2 ** round(math.log2(max(1.0, math.sqrt(n)))))


def ivfpq_params(n: int, dim: int, pq_bytes: int) -> dict[str, int]:
    nlist = min(n_lists(n), max(1, n // 39))  # FAISS wants ~39 training points per list
    return {"nlist": nlist, "pq_m": pq_bytes, "nprobe": min(NPROBE, nlist), "rerank": RERANK}


def ivfpq_ram(n: int, dim: int, params: dict[str, int]) -> int:
    nlist = params["nlist"]
    centroids = nlist * dim * 4 + (nlist * HNSW_M * 2 * 4 if nlist >= HNSW_QUANTIZER_FROM else 0)
    codebooks = 256 * dim * 4
    return n * (params["pq_m"] + ID_BYTES) + centroids + codebooks


def hnsw_ram(n: int, dim: int) -> int:
    return n * (dim * 4 + HNSW_M * 2 * 4 + 2 * ID_BYTES)


def plan(n: int, dim: int, budget: int, index_type: str | None = None) -> Plan:
    """The best index for n vectors of dim within ``budget`` bytes of RAM.

    ``index_type`` None: flat under a thousand vectors, else HNSW if it fits, else IVF-PQ
    (from ten thousand vectors: fewer do not train a quantizer well); "ivfpq": the longest
    codes that fit. A budget nothing fits in is refused, naming the smallest one that works.
    """
    options = _options(n, dim, index_type)
    for option in options:
        if option.ram_bytes <= budget:
            return option
    smallest = min(o.ram_bytes for o in options)
    raise BadInput(
        f"no index of {n:,} vectors of {dim} dimensions fits in {_human(budget)} of RAM; "
        f"the smallest budget that works is {_human(smallest)} (--max-index-memory {math.ceil(smallest / 1e6)}M)"
    )


def _options(n: int, dim: int, index_type: str | None) -> list[Plan]:
    """Candidate indexes, best first."""
    if index_type not in (None, "hnsw", "ivfpq"):
        raise BadInput(f"--max-index-memory plans hnsw or ivfpq indexes, not {index_type}")
    if index_type is None and n < FLAT_BELOW:
        return [Plan("flat", {}, n * (dim * 4 + ID_BYTES))]
    options = []
    if index_type in (None, "hnsw"):
        options.append(Plan("hnsw", {"hnsw_m": HNSW_M, "ef_construction": 80, "ef_search": 64}, hnsw_ram(n, dim)))
    if index_type == "ivfpq" or (index_type is None and n >= QUANTIZE_FROM):
        for pq in (b for b in PQ_BYTES if dim % b == 0):
            params = ivfpq_params(n, dim, pq)
            options.append(Plan("ivfpq", params, ivfpq_ram(n, dim, params)))
    return options


def _human(n: int) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} bytes"
