"""Retrieval metrics for binary codes: mAP@K (the paper's number), full mAP, precision@top-R,
the Hamming-radius precision-recall curve, and recall@K / median rank of each query's own pair.

Definitions (the authors' evaluation code; docs/metrics.md):
- Each query ranks the whole database by Hamming distance. Ties are broken by database index,
  ascending (a stable sort), so the numbers do not depend on the sort algorithm or the device.
- An item is relevant to a query when they share at least one label.
- AP@K of a query: with r_1 < r_2 < ... the positions (1-based) of the relevant items among the
  top K, AP@K = mean over j of j / r_j; a query with no relevant item in its top K has AP 0 and
  still counts in the mean over queries. (As in the authors' DCMH-style calc_map_k, the mean is
  over the relevant items found in the top K, not over all relevant items.)
- Own-pair retrieval (no labels needed): query i's one relevant item is the other half of its
  own pair, ranked among the query set's other modality (the Flickr30K / COCO test protocol);
  recall@K is the share of queries whose pair lies in the top K, the median rank the median
  of those 1-based positions.

Inputs are NumPy arrays or torch tensors: codes in {-1, +1} of any numeric dtype (int8 too),
labels 0/1 of any dtype. The work runs on the device of the first tensor argument (the CPU for
NumPy inputs), in chunks of queries so that memory stays bounded, with no Python loop per query.
- On a CPU, Hamming distances are popcounts of XORed packed bits (NumPy, threads over the
  database): 6 to 8x less CPU time than the float32 matmul route on our test machine. The top-k
  selection is NumPy too: single-threaded NumPy does not stall when other processes hold the
  cores, as torch's OpenMP loops do.
- Elsewhere (CUDA), distances come from a float32 matmul, exact for +-1 entries
  (distance = (nbits - q.r) / 2), and everything stays in torch on that device.
"""
import types
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

CHUNK_BYTES = 2 ** 28     # temporaries of one chunk of queries stay near this (256 MB)
PAIR_BYTES = 16           # per (query, item) pair: distance, mask, sort or candidate temporaries
MAX_CANDIDATES = 0.2      # share of a chunk's pairs above which a full stable sort is cheaper
SAMPLE_STEP = 16          # the top-k bound looks at 1 database column in at most this
POPCOUNT_GROUP = 8        # popcount tiles: queries ...
POPCOUNT_TILE = 16384     # ... x database items (1 MB of uint64 scratch)
LABEL_BITS = 63           # labels packed 63 per int64 word (no sign bit involved)
NUMPY_DTYPES = {torch.uint8: np.uint8, torch.int32: np.int32}  # of the distances


# ===== public metrics =====
def calculate_top_map(qu_B, re_B, qu_L, re_L, topk):
    """mAP@topk (docs/metrics.md) as a float; topk larger than the database means all of it."""
    if topk < 1:
        raise ValueError(f"topk must be at least 1, got {topk}")
    data = _prepare(qu_B, re_B, qu_L, re_L)
    total = 0.0
    for relevant in _ranked_relevance(data, int(topk)):
        total += average_precision(relevant).sum().item()
    return total / data.n_query


def calculate_map(qu_B, re_B, qu_L, re_L):
    """Full mAP: AP over the whole ranking (topk = database size), averaged over queries.

    On a CPU, each query's ranking is a counting sort: a distance takes only nbits + 1
    values, and NumPy's stable argsort of uint8 distances is a radix (counting) sort, linear
    in the database size and stable, so ties stay in index order as everywhere here.
    Relevance comes from a table over the database's distinct label sets (a few hundred on
    these datasets), looked up in ranked order. Elsewhere: mAP@topk with topk = all."""
    data = _prepare(qu_B, re_B, qu_L, re_L)
    if data.device.type != 'cpu' or data.nbits >= 256:
        return calculate_top_map(qu_B, re_B, qu_L, re_L, data.n_db)
    patterns, db_pattern = np.unique(data.db_labels.numpy(), axis=0, return_inverse=True)
    db_pattern = db_pattern.reshape(-1).astype(np.uint16 if len(patterns) < 2 ** 16
                                               else np.int64)
    query_labels = data.query_labels.numpy()
    workers = max(1, torch.get_num_threads())
    total = 0.0
    for lo, hi in _chunks(data, bytes_per_pair=12):
        dist = _popcount_distances(data.query_bits[lo:hi], data.db_bits, data.dist_dtype)
        # which label sets each query shares a label with: (rows, patterns)
        table = ((query_labels[lo:hi, None, :] & patterns[None]) != 0).any(-1)
        # NumPy's sort releases the GIL: the chunk's rows are ranked in threads
        bounds = np.linspace(0, hi - lo, workers + 1).astype(int)
        with ThreadPoolExecutor(workers) as pool:
            total += sum(pool.map(
                lambda a, b: _full_ap_sum(dist[a:b], table[a:b], db_pattern),
                bounds[:-1], bounds[1:]))
    return total / data.n_query


def _full_ap_sum(dist, table, db_pattern):
    """The summed AP of rows of distances, each ranked by a stable (counting) sort."""
    ranked = db_pattern[np.argsort(dist, axis=1, kind='stable')]
    return sum(_full_ap(row_table[row]) for row_table, row in zip(table, ranked))


def _full_ap(relevant):
    """AP of one whole ranking given as booleans in ranked order; 0 if nothing is relevant."""
    positions = np.flatnonzero(relevant) + 1.0   # r_j
    if not len(positions):
        return 0.0
    return float(np.sum(np.arange(1, len(positions) + 1) / positions) / len(positions))


def precision_at_top_r(qu_B, re_B, qu_L, re_L, r_values):
    """Mean over queries of (relevant items among the top R) / R, for each R in r_values.

    Same stable ranking as mAP. An R larger than the database is clipped to its size.
    Returns a float64 NumPy array shaped like r_values.
    """
    r = np.asarray(r_values, dtype=np.int64)
    if r.size == 0 or r.min() < 1:
        raise ValueError(f"every R must be at least 1, got {r_values}")
    data = _prepare(qu_B, re_B, qu_L, re_L)
    r = np.minimum(r, data.n_db)
    columns = torch.as_tensor(r.ravel() - 1, device=data.device)
    total = np.zeros(r.size, dtype=np.float64)
    for relevant in _ranked_relevance(data, int(r.max())):
        hits = relevant.to(torch.float64).cumsum(1)  # hits[:, R - 1]: relevant in the top R
        total += hits[:, columns].sum(0).cpu().numpy()
    return total.reshape(r.shape) / (r * data.n_query)


def pr_curve_hamming(qu_B, re_B, qu_L, re_L):
    """Precision and recall of Hamming-ball retrieval, for radius 0 .. nbits.

    At radius r a query retrieves every database item within Hamming distance r.
    precision[r]: mean, over the queries that retrieve at least one item, of
        (relevant retrieved) / (retrieved). A query that retrieves nothing has no precision:
        it is left out at that radius (NaN where no query retrieves anything).
    recall[r]: mean, over the queries with at least one relevant item in the database, of
        (relevant retrieved) / (relevant in the database).
    Returns two float64 NumPy arrays of length nbits + 1.
    """
    data = _prepare(qu_B, re_B, qu_L, re_L)
    retrieved = torch.zeros(data.n_query, data.nbits + 1, dtype=torch.float64,
                            device=data.device)
    hits = torch.zeros_like(retrieved)
    for lo, hi in _chunks(data, bytes_per_pair=48):
        dist = _distances(data, lo, hi).long()
        relevant = _relevant(data.query_labels[lo:hi, None], data.db_labels[None])
        # per query: how many items, and how many relevant ones, lie at each distance
        retrieved[lo:hi].scatter_add_(1, dist, torch.ones_like(dist, dtype=torch.float64))
        hits[lo:hi].scatter_add_(1, dist, relevant.to(torch.float64))
    retrieved, hits = retrieved.cumsum(1), hits.cumsum(1)  # now: within radius r
    n_relevant = hits[:, -1:]
    precision = _mean_where(hits / retrieved.clamp(min=1), retrieved > 0)
    recall = _mean_where(hits / n_relevant.clamp(min=1), (n_relevant > 0).expand_as(hits))
    return precision.cpu().numpy(), recall.cpu().numpy()


# ===== own-pair retrieval (no labels) =====
RECALL_KS = (1, 5, 10)


def pair_ranks(qu_B, re_B):
    """1-based position of re_B[i] in the stable Hamming ranking of all of re_B for query
    qu_B[i]: row i of both is one pair. Ties go by index, as in every ranking here, so the
    position is 1 + (items nearer) + (items as near with a lower index). int64 NumPy array."""
    if len(qu_B) != len(re_B):
        raise ValueError(f"own-pair ranks need as many items as queries, got {len(re_B)} "
                         f"and {len(qu_B)}")
    no_labels = np.zeros((len(qu_B), 1), dtype=np.uint8)
    data = _prepare(qu_B, re_B, no_labels, no_labels)
    ranks = []
    for lo, hi in _chunks(data, bytes_per_pair=8):
        dist = _distances(data, lo, hi).to(torch.int32)
        rows = torch.arange(hi - lo, device=dist.device)
        own = dist[rows, rows + lo][:, None]
        before = torch.arange(data.n_db, device=dist.device)[None] < (rows + lo)[:, None]
        ahead = (dist < own) | ((dist == own) & before)
        ranks.append(ahead.sum(1).cpu().numpy() + 1)
    return np.concatenate(ranks).astype(np.int64)


def recall_at(ranks, ks=RECALL_KS):
    """{"K": share of ranks <= K} for each K (string keys, as results.json stores them)."""
    ranks = np.asarray(ranks)
    return {str(k): float(np.mean(ranks <= k)) for k in ks}


def pair_retrieval(img_B, txt_B):
    """Recall@1/5/10 and median rank both ways for row-aligned image and text codes of the
    same pairs: each image ranks all the texts (I->T), each text all the images (T->I).
    The median of an even count is the mean of the middle two (np.median)."""
    i2t, t2i = pair_ranks(img_B, txt_B), pair_ranks(txt_B, img_B)
    return {'recall_i2t': recall_at(i2t), 'recall_t2i': recall_at(t2i),
            'median_rank_i2t': float(np.median(i2t)), 'median_rank_t2i': float(np.median(t2i))}


# ===== inputs =====
def _prepare(qu_B, re_B, qu_L, re_L):
    """Checks the inputs and lays them out for fast distances on their device."""
    device = next((x.device for x in (qu_B, re_B, qu_L, re_L) if torch.is_tensor(x)),
                  torch.device('cpu'))
    q, db = _codes(qu_B, device), _codes(re_B, device)
    q_labels, db_labels = _labels(qu_L, device), _labels(re_L, device)
    if q.shape[1] != db.shape[1]:
        raise ValueError(f"query codes have {q.shape[1]} bits, database codes {db.shape[1]}")
    if (len(q_labels), len(db_labels)) != (len(q), len(db)) or \
            q_labels.shape[1] != db_labels.shape[1]:
        raise ValueError(f"labels {tuple(q_labels.shape)} and {tuple(db_labels.shape)} do not "
                         f"match codes {tuple(q.shape)} and {tuple(db.shape)}")
    if len(q) == 0 or len(db) == 0:
        raise ValueError("no query or no database item")
    data = types.SimpleNamespace(device=device, nbits=q.shape[1], n_query=len(q), n_db=len(db))
    data.query_labels, data.db_labels = _pack_labels(q_labels), _pack_labels(db_labels)
    data.dist_dtype = torch.uint8 if data.nbits < 256 else torch.int32
    if device.type == 'cpu':
        data.query_bits = _pack_bits(q.numpy())
        data.db_bits = np.ascontiguousarray(_pack_bits(db.numpy()).T)  # (words, n_db)
    else:
        data.query_codes, data.db_codes = q.float(), db.float()
    return data


def _codes(x, device):
    """A 2-D code tensor on `device`; refuses anything but -1 and +1."""
    x = torch.as_tensor(x).detach().to(device)
    if x.ndim != 2:
        raise ValueError(f"codes must be 2-D (items, bits), got shape {tuple(x.shape)}")
    if x.dtype == torch.bool or not bool((x.abs() == 1).all()):
        # {0, 1} codes would silently give wrong distances
        raise ValueError("codes must hold only -1 and +1")
    return x


def _labels(x, device):
    x = torch.as_tensor(x).detach().to(device)
    if x.ndim != 2:
        raise ValueError(f"labels must be 2-D (items, classes), got shape {tuple(x.shape)}")
    return x != 0


def _pack_bits(codes):
    """+-1 codes (n, nbits) -> (n, words) uint64, bit set where the code is +1."""
    packed = np.packbits(codes > 0, axis=1)
    pad = -packed.shape[1] % 8  # zero bytes up to whole 64-bit words: equal in every code
    return np.ascontiguousarray(np.pad(packed, ((0, 0), (0, pad)))).view(np.uint64)


def _pack_labels(labels):
    """Boolean labels (n, c) -> (n, words) int64 bit masks: relevance becomes one AND."""
    words = []
    for lo in range(0, max(labels.shape[1], 1), LABEL_BITS):
        part = labels[:, lo:lo + LABEL_BITS].long()
        shifts = torch.arange(part.shape[1], device=labels.device)
        words.append((part << shifts).sum(1))  # distinct powers of two: the sum is exact
    return torch.stack(words, 1)


def _relevant(query_masks, db_masks):
    """Shares at least one label; broadcasts (..., words) masks."""
    return ((query_masks & db_masks) != 0).any(-1)


# ===== Hamming distances =====
def _chunks(data, bytes_per_pair):
    """(lo, hi) query ranges whose temporaries stay near CHUNK_BYTES."""
    rows = max(1, int(CHUNK_BYTES // (bytes_per_pair * data.n_db)))
    return [(lo, min(lo + rows, data.n_query)) for lo in range(0, data.n_query, rows)]


def _distances(data, lo, hi):
    """Hamming distances (hi - lo, n_db) of queries lo..hi to the whole database."""
    if data.device.type == 'cpu':
        return torch.from_numpy(_popcount_distances(data.query_bits[lo:hi], data.db_bits,
                                                    data.dist_dtype))
    return _matmul_distances(data.query_codes[lo:hi], data.db_codes, data.dist_dtype)


def _popcount_distances(query_bits, db_bits, dtype):
    """query_bits (rows, words), db_bits (words, n_db) uint64 -> popcount of their XOR.

    NumPy releases the GIL inside its loops, so threads over slices of the database use the
    cores torch is allowed to use.
    """
    n_db = db_bits.shape[1]
    out = np.empty((len(query_bits), n_db), dtype=NUMPY_DTYPES[dtype])
    workers = max(1, min(torch.get_num_threads(), n_db // 4096))
    edges = np.linspace(0, n_db, workers + 1).astype(int)
    parts = [(query_bits, db_bits[:, a:b], out[:, a:b]) for a, b in zip(edges, edges[1:])]
    if workers == 1:
        _popcount_into(*parts[0])
    else:
        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(lambda part: _popcount_into(*part), parts))
    return out


def _popcount_into(query_bits, db_bits, out):
    """out[i, j] = number of differing bits of query i and database item j.

    Tiles of POPCOUNT_GROUP queries x POPCOUNT_TILE items keep the scratch near 1 MB, in
    cache: twice as fast here as whole database rows."""
    scratch = np.empty((POPCOUNT_GROUP, POPCOUNT_TILE), dtype=np.uint64)
    counts = np.empty(scratch.shape, dtype=np.uint8)
    for a in range(0, db_bits.shape[1], POPCOUNT_TILE):
        tile = db_bits[:, a:a + POPCOUNT_TILE]
        for lo in range(0, len(query_bits), POPCOUNT_GROUP):
            group = query_bits[lo:lo + POPCOUNT_GROUP]
            x, c = scratch[:len(group), :tile.shape[1]], counts[:len(group), :tile.shape[1]]
            total = out[lo:lo + len(group), a:a + tile.shape[1]]
            for w in range(tile.shape[0]):
                np.bitwise_xor(group[:, w, None], tile[w], out=x)
                np.bitwise_count(x, out=total if w == 0 else c)
                if w > 0:
                    np.add(total, c, out=total)


def _matmul_distances(query_codes, db_codes, dtype):
    """(nbits - q.r) / 2 from a float32 matmul: exact, since +-1 products sum to integers far
    below 2**24 (TF32 keeps +-1 exact too)."""
    nbits = query_codes.shape[1]
    return ((nbits - query_codes @ db_codes.T) * 0.5).round().to(dtype)


# ===== stable top-k =====
# Both versions: every item at or below an upper bound of the row's k-th smallest distance is
# a candidate; sorting the candidates on the integer key (row, distance, index) gives the
# stable order, and the first k of each row are the answer. The k-th smallest of any k or more
# of a row's entries is such a bound, so a sample of columns gives one cheaply; the bound only
# decides how many candidates get sorted, never which items come out. When the candidates are
# a large part of the rows (k near the database size, or massive ties), a full stable sort of
# the rows is cheaper, and needs less memory.
def _stable_top_indices(dist, k):
    """Indices (rows, k) of each row's k smallest distances, ties by index ascending."""
    if dist.device.type == 'cpu':
        return torch.from_numpy(_stable_top_numpy(dist.numpy(), k))
    return _stable_top_torch(dist, k)


def _sample_step(n, k):
    """Sampling 1 column in `step` costs n / step to partition but lets about k * step
    candidates through to the sort; sqrt(n / 5k) balances the two (measured), and keeps at
    least k columns in the sample."""
    return max(1, min(SAMPLE_STEP, int((n / (5 * k)) ** 0.5)))


def _stable_top_numpy(dist, k):
    rows, n = dist.shape
    if k < n:
        bound = np.partition(dist[:, ::_sample_step(n, k)], k - 1, axis=1)[:, k - 1:k]
        mask = dist <= bound
        if np.count_nonzero(mask) <= MAX_CANDIDATES * rows * n:
            return _sort_candidates_numpy(dist, np.flatnonzero(mask), int(bound.max()), k)
    # NumPy's stable sort of uint8 is a radix sort: 5x faster than sorting keys of all items
    return np.argsort(dist, axis=1, kind='stable')[:, :k]


def _sort_candidates_numpy(dist, flat, max_dist, k):
    """flat: the candidates' flat positions, row-major (so index ascending within a row)."""
    rows, n = dist.shape
    candidate_dist = dist.ravel()[flat]
    key, col = np.divmod(flat, n)  # key starts as the row
    counts = np.bincount(key, minlength=rows)
    starts = np.cumsum(counts) - counts
    key *= max_dist + 1  # in place: fewer temporaries
    key += candidate_dist
    key *= n
    key += col
    key.sort()
    return key[starts[:, None] + np.arange(k)] % n  # every row has at least k candidates


def _stable_top_torch(dist, k):
    rows, n = dist.shape
    if k < n:
        bound = dist[:, ::_sample_step(n, k)].topk(k, dim=1, largest=False).values[:, -1:]
        mask = dist <= bound
        if int(mask.sum()) <= MAX_CANDIDATES * rows * n:
            flat = torch.nonzero(mask.reshape(-1)).squeeze(1)
            return _sort_candidates_torch(dist, flat, int(bound.max()), k)
    return torch.sort(dist, dim=1, stable=True).indices[:, :k]


def _sort_candidates_torch(dist, flat, max_dist, k):
    rows, n = dist.shape
    row, col = flat // n, flat % n
    key = torch.sort((row * (max_dist + 1) + dist.reshape(-1)[flat].long()) * n + col).values
    counts = torch.bincount(row, minlength=rows)
    starts = counts.cumsum(0) - counts
    return key[starts[:, None] + torch.arange(k, device=dist.device)] % n


# ===== averaging =====
def _ranked_relevance(data, k):
    """For each chunk of queries: (rows, k) booleans, relevance of the stable top-k items."""
    k = min(k, data.n_db)
    # per ranked item: its index, label masks and AP temporaries
    for lo, hi in _chunks(data, PAIR_BYTES + 64 * k / data.n_db):
        top = _stable_top_indices(_distances(data, lo, hi), k)
        yield _relevant(data.query_labels[lo:hi, None], data.db_labels[top])


def average_precision(relevant):
    """AP of each row of a (rows, k) relevance matrix, in float64; 0 where nothing is relevant."""
    relevant = relevant.to(torch.float64)
    positions = torch.arange(1, relevant.shape[1] + 1, device=relevant.device)
    found = relevant.sum(1)
    # j / r_j at each relevant position r_j: the hits so far divided by the position
    precision_sum = (relevant.cumsum(1) / positions * relevant).sum(1)
    return torch.where(found > 0, precision_sum / found.clamp(min=1), 0.0)


def _mean_where(values, valid):
    """Column means over the rows where `valid` holds; NaN for a column with none."""
    count = valid.sum(0)
    total = torch.where(valid, values, 0.0).sum(0)
    return torch.where(count > 0, total / count.clamp(min=1), float('nan'))
