"""metric.py against a plain reference written here from the definitions (docs/metrics.md), on
a hand-computed example and on random codes with massive ties."""
import numpy as np
import pytest
import torch

import bench
from bench import random_task
import metric


# ===== plain reference: one query, one item at a time =====
def ref_ranking(query_code, db_codes):
    """Database indices by Hamming distance, ties by index: an explicit (distance, index) key,
    so nothing depends on a sort being stable."""
    dist = [int(np.count_nonzero(query_code != code)) for code in db_codes]
    return sorted(range(len(db_codes)), key=lambda j: (dist[j], j)), dist


def ref_relevant(query_labels, db_labels):
    return [bool(np.any((query_labels != 0) & (labels != 0))) for labels in db_labels]


def ref_ap(relevant_in_order):
    """Mean of j / r_j over the relevant positions r_1 < r_2 < ...; 0 if there are none."""
    found, terms = 0, []
    for position, relevant in enumerate(relevant_in_order, start=1):
        if relevant:
            found += 1
            terms.append(found / position)
    return sum(terms) / len(terms) if terms else 0.0


def ref_ranked_relevance(qu_B, re_B, qu_L, re_L):
    for i in range(len(qu_B)):
        order, _ = ref_ranking(qu_B[i], re_B)
        relevant = ref_relevant(qu_L[i], re_L)
        yield [relevant[j] for j in order]


def ref_map(qu_B, re_B, qu_L, re_L, topk):
    aps = [ref_ap(ranked[:topk]) for ranked in ref_ranked_relevance(qu_B, re_B, qu_L, re_L)]
    return sum(aps) / len(aps)


def ref_precision_at(qu_B, re_B, qu_L, re_L, r_values):
    rows = [[sum(ranked[:r]) / r for r in r_values]
            for ranked in ref_ranked_relevance(qu_B, re_B, qu_L, re_L)]
    return np.mean(rows, axis=0)


def ref_pr(qu_B, re_B, qu_L, re_L):
    nbits = qu_B.shape[1]
    precisions = [[] for _ in range(nbits + 1)]
    recalls = [[] for _ in range(nbits + 1)]
    for i in range(len(qu_B)):
        _, dist = ref_ranking(qu_B[i], re_B)
        relevant = ref_relevant(qu_L[i], re_L)
        for r in range(nbits + 1):
            retrieved = [j for j in range(len(re_B)) if dist[j] <= r]
            hits = sum(relevant[j] for j in retrieved)
            if retrieved:  # no precision for an empty retrieval
                precisions[r].append(hits / len(retrieved))
            if sum(relevant):  # no recall without relevant items
                recalls[r].append(hits / sum(relevant))
    mean = lambda xs: sum(xs) / len(xs) if xs else float('nan')
    return np.array([mean(p) for p in precisions]), np.array([mean(r) for r in recalls])


# ===== a hand-computed example =====
# 4 bits, 5 database items, 3 queries, 3 classes.
HAND_DB = np.array([[+1, +1, +1, +1],    # d0, labels {1}
                    [-1, +1, +1, +1],    # d1, labels {0, 1}
                    [+1, +1, +1, +1],    # d2, labels {2}
                    [-1, -1, +1, +1],    # d3, labels {0}
                    [+1, -1, +1, +1]])   # d4, labels {1, 2}
HAND_DB_LABELS = np.array([[0, 1, 0], [1, 1, 0], [0, 0, 1], [1, 0, 0], [0, 1, 1]])
HAND_QUERY = np.array([[+1, +1, +1, +1],   # q0, labels {0}
                       [-1, -1, -1, -1],   # q1, labels {1}
                       [+1, +1, -1, -1]])  # q2, no label: nothing is relevant to it
HAND_QUERY_LABELS = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 0]])
HAND = (HAND_QUERY, HAND_DB, HAND_QUERY_LABELS, HAND_DB_LABELS)
# q0: distances d0..d4 = 0 1 0 2 1 -> ranking d0 d2 d1 d4 d3 (d1 before d4: ties by index),
#     relevant: - - + - +, relevant positions 3, 5.
#     AP@5 = (1/3 + 2/5) / 2 = 11/30; AP@3 = (1/3) / 1 = 1/3; AP@2 = 0.
#     (Ties broken the other way, d4 before d1: AP@5 = (1/4 + 2/5) / 2 = 13/40.)
# q1: distances 4 3 4 2 3 -> ranking d3 d1 d4 d0 d2, relevant: - + + + -, positions 2, 3, 4.
#     AP@5 = (1/2 + 2/3 + 3/4) / 3 = 23/36; AP@3 = (1/2 + 2/3) / 2 = 7/12; AP@2 = 1/2.
# q2: nothing relevant: AP 0 at every K, and it still counts in the mean.
HAND_MAP = {1: 0.0, 2: (0 + 1 / 2 + 0) / 3, 3: (1 / 3 + 7 / 12 + 0) / 3,
            5: (11 / 30 + 23 / 36 + 0) / 3}
# precision@R, R = 1..5: q0 0 0 1/3 1/4 2/5; q1 0 1/2 2/3 3/4 3/5; q2 zeros.
HAND_P_AT_R = [0.0, 1 / 6, 1 / 3, 1 / 3, 1 / 3]
# Hamming ball, radius 0..4 (retrieved, relevant retrieved):
# q0 (2 relevant): (2, 0) (4, 1) (5, 2) (5, 2) (5, 2)
# q1 (3 relevant): (0, 0) (0, 0) (1, 0) (3, 2) (5, 3)
# q2 (0 relevant, distances 2 3 2 4 3): (0, 0) (0, 0) (2, 0) (4, 0) (5, 0)
# precision (queries that retrieve something): r0 q0: 0; r1 q0: 1/4; r2 (2/5 + 0 + 0) / 3;
#   r3 (2/5 + 2/3 + 0) / 3; r4 (2/5 + 3/5 + 0) / 3.   recall (q0, q1 only): 0, 1/4, 1/2, 5/6, 1.
HAND_PRECISION = [0.0, 1 / 4, 2 / 15, 16 / 45, 1 / 3]
HAND_RECALL = [0.0, 1 / 4, 1 / 2, 5 / 6, 1.0]


@pytest.mark.parametrize('topk', [1, 2, 3, 5])
def test_hand_example_map(topk):
    assert metric.calculate_top_map(*HAND, topk) == pytest.approx(HAND_MAP[topk], abs=1e-12)
    assert ref_map(*HAND, topk) == pytest.approx(HAND_MAP[topk], abs=1e-12)


def test_hand_example_topk_beyond_database_and_full_map():
    assert metric.calculate_top_map(*HAND, 100) == pytest.approx(HAND_MAP[5], abs=1e-12)
    assert metric.calculate_map(*HAND) == pytest.approx(HAND_MAP[5], abs=1e-12)


def test_hand_example_precision_at_r():
    got = metric.precision_at_top_r(*HAND, [1, 2, 3, 4, 5])
    np.testing.assert_allclose(got, HAND_P_AT_R, atol=1e-12)
    # an R beyond the database is clipped to it
    np.testing.assert_allclose(metric.precision_at_top_r(*HAND, [9]), [1 / 3], atol=1e-12)


def test_hand_example_pr_curve():
    precision, recall = metric.pr_curve_hamming(*HAND)
    np.testing.assert_allclose(precision, HAND_PRECISION, atol=1e-12)
    np.testing.assert_allclose(recall, HAND_RECALL, atol=1e-12)
    ref_p, ref_r = ref_pr(*HAND)
    np.testing.assert_allclose(ref_p, HAND_PRECISION, atol=1e-12)
    np.testing.assert_allclose(ref_r, HAND_RECALL, atol=1e-12)


def test_pr_curve_empty_retrieval_gives_nan():
    query = np.array([[1, 1, 1]])
    db = np.array([[-1, 1, 1], [-1, -1, 1]])
    precision, recall = metric.pr_curve_hamming(query, db, [[1]], [[1], [0]])
    assert np.isnan(precision[0])  # nobody retrieves anything at radius 0
    np.testing.assert_allclose(precision[1:], [1, 1 / 2, 1 / 2])
    np.testing.assert_allclose(recall, [0, 1, 1, 1])


# ===== random codes with massive ties, against the reference =====
@pytest.mark.parametrize('nbits, n_db, topk', [(3, 200, 7), (8, 400, 1), (8, 400, 50),
                                                (8, 300, 1000), (16, 500, 60),
                                                (100, 300, 20)])
def test_map_matches_reference(nbits, n_db, topk):
    task = random_task(seed=nbits, n_query=30, n_db=n_db, nbits=nbits, n_labels=5)
    expect = ref_map(*task, topk)
    assert abs(metric.calculate_top_map(*task, topk) - expect) < 1e-9


def test_full_map_and_precision_at_r_match_reference():
    task = random_task(seed=1, n_query=20, n_db=300, nbits=8, n_labels=4)
    assert abs(metric.calculate_map(*task) - ref_map(*task, 300)) < 1e-9
    r = [1, 5, 17, 100, 300]
    np.testing.assert_allclose(metric.precision_at_top_r(*task, r),
                               ref_precision_at(*task, r), atol=1e-9)


@pytest.mark.parametrize('nbits', [4, 70])
def test_pr_curve_matches_reference(nbits):
    task = random_task(seed=2, n_query=15, n_db=120, nbits=nbits, n_labels=3)
    precision, recall = metric.pr_curve_hamming(*task)
    ref_p, ref_r = ref_pr(*task)
    np.testing.assert_allclose(precision, ref_p, atol=1e-9)
    np.testing.assert_allclose(recall, ref_r, atol=1e-9)


def test_queries_without_relevant_items_count_as_zero():
    q, db, ql, dbl = random_task(seed=3, n_query=10, n_db=200, nbits=8, n_labels=3)
    ql[::2] = 0  # half the queries have no label at all
    with_empty = metric.calculate_top_map(q, db, ql, dbl, 20)
    assert abs(with_empty - ref_map(q, db, ql, dbl, 20)) < 1e-9
    only_labelled = metric.calculate_top_map(q[1::2], db, ql[1::2], dbl, 20)
    assert with_empty == pytest.approx(only_labelled / 2)


def test_identical_codes_rank_by_index():
    # every distance ties: the top k is the first k database items
    q = np.ones((3, 8))
    db = np.ones((40, 8))
    db_labels = np.zeros((40, 2))
    db_labels[[1, 4, 30], 0] = 1
    q_labels = np.array([[1, 0], [1, 0], [0, 1]])
    # relevant at positions 2 and 5 within the top 10: AP = (1/2 + 2/5) / 2 for two queries
    expect = 2 * (1 / 2 + 2 / 5) / 2 / 3
    assert metric.calculate_top_map(q, db, q_labels, db_labels, 10) == pytest.approx(expect)


# ===== inputs and code paths =====
def test_numpy_and_torch_inputs_and_dtypes_agree():
    q, db, ql, dbl = random_task(seed=4, n_query=25, n_db=300, nbits=16, n_labels=4)
    expect = metric.calculate_top_map(q, db, ql, dbl, 30)
    variants = [(q.astype(np.float32), db.astype(np.float64), ql.astype(bool), dbl),
                (q.astype(np.int64), db, ql.astype(np.float32), dbl.astype(np.int32)),
                (torch.from_numpy(q), torch.from_numpy(db), torch.from_numpy(ql),
                 torch.from_numpy(dbl)),
                (torch.from_numpy(q).float(), db, torch.from_numpy(ql).bool(), dbl)]
    for variant in variants:
        assert metric.calculate_top_map(*variant, 30) == expect
    ranks = metric.precision_at_top_r(*variants[2], [1, 10])
    assert isinstance(ranks, np.ndarray)
    np.testing.assert_allclose(ranks, metric.precision_at_top_r(q, db, ql, dbl, [1, 10]))


def test_torch_path_matches_numpy_path():
    # the CUDA code path (matmul distances, torch top-k), run on the CPU
    q, db, _, _ = random_task(seed=5, n_query=40, n_db=700, nbits=8, n_labels=2)
    qt, dbt = torch.from_numpy(q).float(), torch.from_numpy(db).float()
    dist = metric._matmul_distances(qt, dbt, torch.uint8)
    packed = metric._popcount_distances(metric._pack_bits(q),
                                        np.ascontiguousarray(metric._pack_bits(db).T), torch.uint8)
    assert torch.equal(dist, torch.from_numpy(packed))
    for k in (1, 9, 64, 200, 699, 700):
        by_torch = metric._stable_top_torch(dist, k)
        by_numpy = torch.from_numpy(metric._stable_top_numpy(dist.numpy(), k))
        assert torch.equal(by_torch, by_numpy)
        assert torch.equal(by_numpy, torch.from_numpy(
            np.argsort(dist.numpy(), axis=1, kind='stable')[:, :k]))


def test_small_chunks_and_tiles_give_the_same_values(monkeypatch):
    task = random_task(seed=6, n_query=30, n_db=500, nbits=8, n_labels=3)
    expect = (metric.calculate_top_map(*task, 40), metric.precision_at_top_r(*task, [5, 50]),
              metric.pr_curve_hamming(*task))
    monkeypatch.setattr(metric, 'CHUNK_BYTES', 1)  # one query per chunk
    monkeypatch.setattr(metric, 'POPCOUNT_TILE', 64)  # partial popcount tiles and groups
    monkeypatch.setattr(metric, 'POPCOUNT_GROUP', 3)
    assert metric.calculate_top_map(*task, 40) == pytest.approx(expect[0], abs=1e-12)
    np.testing.assert_allclose(metric.precision_at_top_r(*task, [5, 50]), expect[1])
    for got, want in zip(metric.pr_curve_hamming(*task), expect[2]):
        np.testing.assert_allclose(got, want)


def test_long_codes_and_many_classes():
    # 300 bits: distances beyond uint8; 70 classes: two words of label bits
    task = random_task(seed=7, n_query=12, n_db=150, nbits=300, n_labels=70, density=0.02)
    assert abs(metric.calculate_top_map(*task, 25) - ref_map(*task, 25)) < 1e-9


def test_rejects_bad_inputs():
    q, db, ql, dbl = random_task(seed=8, n_query=3, n_db=10, nbits=8, n_labels=2)
    with pytest.raises(ValueError, match='-1 and \\+1'):
        metric.calculate_top_map((q > 0).astype(np.uint8), db, ql, dbl, 5)
    with pytest.raises(ValueError, match='bits'):
        metric.calculate_top_map(q[:, :4], db, ql, dbl, 5)
    with pytest.raises(ValueError, match='labels'):
        metric.calculate_top_map(q, db, ql[:2], dbl, 5)
    with pytest.raises(ValueError, match='topk'):
        metric.calculate_top_map(q, db, ql, dbl, 0)
    with pytest.raises(ValueError, match='R'):
        metric.precision_at_top_r(q, db, ql, dbl, [0, 5])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    task = random_task(seed=9, n_query=50, n_db=3000, nbits=16, n_labels=5)
    cuda = [torch.from_numpy(x).cuda() for x in task]
    assert metric.calculate_top_map(*cuda, 50) == pytest.approx(
        metric.calculate_top_map(*task, 50), abs=1e-12)
    np.testing.assert_allclose(metric.precision_at_top_r(*cuda, [1, 100]),
                               metric.precision_at_top_r(*task, [1, 100]))
    for got, want in zip(metric.pr_curve_hamming(*cuda), metric.pr_curve_hamming(*task)):
        np.testing.assert_allclose(got, want)


# ===== bench.py =====
def test_bench_loop_and_eval_agree_with_reference():
    task = random_task(seed=10, n_query=15, n_db=200, nbits=8, n_labels=3)
    assert abs(bench.map_loop(*task, 20) - ref_map(*task, 20)) < 1e-9
    out = bench.bench_eval(n_query=20, n_db=300, nbits=16, n_labels=4, topk=10, repeats=1,
                           loop_queries=10)
    assert out['difference'] < 1e-9
    same = random_task(20, 300, 16, 4)   # the task bench_eval draws (seed 0)
    assert out['fast_map'] == pytest.approx(ref_map(*same, 10), abs=1e-12)
    assert out['loop_map'] == pytest.approx(ref_map(same[0][:10], same[1], same[2][:10],
                                                    same[3], 10), abs=1e-12)


# ===== own-pair retrieval: recall@K and median rank =====
def ref_pair_ranks(qu_B, re_B):
    """Position (1-based) of item i in query i's reference ranking."""
    return [ref_ranking(qu_B[i], re_B)[0].index(i) + 1 for i in range(len(qu_B))]


def test_hand_example_pair_retrieval():
    # 3 pairs, 2 bits. Image codes and text codes, row i = pair i.
    img = np.array([[1, 1], [1, -1], [-1, -1]])
    txt = np.array([[1, -1], [1, -1], [-1, -1]])
    # I->T. image 0 = (1, 1): distances to texts 1, 1, 2 -> order 0, 1, 2 (tie by index),
    #   its text 0 at rank 1. image 1 = (1, -1): distances 0, 0, 1 -> order 0, 1, 2; text 1
    #   is behind text 0 (same distance, lower index): rank 2. image 2: distances 1, 1, 0 -> 1.
    assert metric.pair_ranks(img, txt).tolist() == [1, 2, 1]
    # T->I. text 0 = (1, -1): distances to images 1, 0, 1 -> order 1, 0, 2: image 0 at rank 2.
    #   text 1: the same distances, image 1 at rank 1. text 2 = (-1, -1): 2, 1, 0 -> rank 1.
    assert metric.pair_ranks(txt, img).tolist() == [2, 1, 1]
    result = metric.pair_retrieval(img, txt)
    assert result['recall_i2t'] == {'1': 2 / 3, '5': 1.0, '10': 1.0}
    assert result['recall_t2i'] == {'1': 2 / 3, '5': 1.0, '10': 1.0}
    assert result['median_rank_i2t'] == 1.0 and result['median_rank_t2i'] == 1.0


@pytest.mark.parametrize('nbits, n', [(4, 60), (8, 200), (70, 50)])
def test_pair_ranks_match_reference(nbits, n):
    img, txt, _, _ = random_task(seed=nbits, n_query=n, n_db=n, nbits=nbits, n_labels=1)
    expected = ref_pair_ranks(img, txt)
    assert metric.pair_ranks(img, txt).tolist() == expected
    assert metric.pair_ranks(torch.from_numpy(img), torch.from_numpy(txt)).tolist() == expected
    result = metric.pair_retrieval(img, txt)
    for k in (1, 5, 10):
        assert result['recall_i2t'][str(k)] == pytest.approx(np.mean(np.array(expected) <= k))
    assert result['median_rank_i2t'] == np.median(expected)
    assert result['median_rank_t2i'] == np.median(ref_pair_ranks(txt, img))


def test_pair_ranks_in_small_chunks(monkeypatch):
    img, txt, _, _ = random_task(seed=11, n_query=90, n_db=90, nbits=6, n_labels=1)
    expected = ref_pair_ranks(img, txt)
    monkeypatch.setattr(metric, 'CHUNK_BYTES', 8 * 90 * 7)   # 7 queries a chunk
    assert metric.pair_ranks(img, txt).tolist() == expected


def test_identical_codes_give_pair_rank_by_index():
    codes = np.ones((5, 8), dtype=np.int8)
    assert metric.pair_ranks(codes, codes).tolist() == [1, 2, 3, 4, 5]
    with pytest.raises(ValueError, match='as many items'):
        metric.pair_ranks(codes, codes[:4])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_pair_ranks_cuda_matches_cpu():
    img, txt, _, _ = random_task(seed=12, n_query=300, n_db=300, nbits=16, n_labels=1)
    cuda = metric.pair_ranks(torch.from_numpy(img).cuda(), torch.from_numpy(txt).cuda())
    assert cuda.tolist() == metric.pair_ranks(img, txt).tolist()
