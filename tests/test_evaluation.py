"""Retrieval metrics against small cases worked out by hand, and the chunked engine against brute force."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from coembed.metrics import (TIE_TOLERANCE, chance_average_precision, chance_recall, find_duplicates,
                                mean_recall_at_1, pair_ranks, paired_retrieval, rank_gallery, recall_metrics)


def unit(*cosines: float) -> torch.Tensor:
    """2-D unit vectors whose cosine with the query ``[1, 0]`` is each given value."""
    c = torch.tensor(cosines, dtype=torch.float64)
    return torch.stack([c, (1 - c**2).sqrt()], dim=1).float()


QUERY = torch.tensor([[1.0, 0.0]])


def test_ranks_and_average_precision_by_hand():
    # gallery scores 0.9 0.8 0.7 0.6 0.5; relevant (label 0) are the 1st and the 3rd
    gallery = unit(0.9, 0.8, 0.7, 0.6, 0.5)
    r = rank_gallery(QUERY, gallery, torch.tensor([0]), torch.tensor([0, 1, 0, 1, 1]))
    assert r.first_rank.tolist() == [1]
    assert r.average_precision.item() == pytest.approx((1 / 1 + 2 / 3) / 2)
    assert r.n_relevant.tolist() == [2] and r.gallery_size == 5
    # three relevant items at ranks 2, 4, 5
    r = rank_gallery(QUERY, gallery, torch.tensor([0]), torch.tensor([1, 0, 1, 0, 0]))
    assert r.first_rank.tolist() == [2]
    assert r.average_precision.item() == pytest.approx((1 / 2 + 2 / 4 + 3 / 5) / 3)


def test_ties_count_against_the_relevant_item():
    # a non-relevant item with exactly the relevant item's score ranks before it
    gallery = unit(0.9, 0.9, 0.5)
    r = rank_gallery(QUERY, gallery, torch.tensor([0]), torch.tensor([1, 0, 0]))
    assert r.first_rank.tolist() == [2]
    assert r.average_precision.item() == pytest.approx((1 / 2 + 2 / 3) / 2)
    # relevant items tied with each other do not push each other down
    r = rank_gallery(QUERY, unit(0.9, 0.9, 0.5), torch.tensor([0]), torch.tensor([0, 0, 1]))
    assert r.first_rank.tolist() == [1] and r.average_precision.item() == pytest.approx(1.0)
    # a constant model: every item ties, the match ranks last
    same = torch.ones(4, 3)
    assert pair_ranks(same, same).tolist() == [4, 4, 4, 4]
    # cosines closer than TIE_TOLERANCE tie (1 - cos(1e-4) = 5e-9); further apart (1 - cos(1e-2) = 5e-5) do not
    queries = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    assert 1 - math.cos(1e-4) < TIE_TOLERANCE < 1 - math.cos(1e-2)
    assert pair_ranks(queries, torch.tensor([[1.0, 0.0], [1.0, 1e-4]])).tolist() == [2, 2]
    assert pair_ranks(queries, torch.tensor([[1.0, 0.0], [1.0, 1e-2]])).tolist() == [1, 2]


def test_pair_ranks_by_hand():
    queries = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    gallery = torch.tensor([[0.0, 1.0], [0.0, 1.0], [1.0, 0.9]])
    # q0 = x-axis: scores 0, 0, 0.74 -> its match g0 (0) ties g1 and trails g2: rank 3
    # q1 = y-axis: scores 1, 1, 0.67 -> g1 ties g0: rank 2
    # q2 = diagonal: scores .71, .71, .999 -> g2 first: rank 1
    assert pair_ranks(queries, gallery).tolist() == [3, 2, 1]
    with pytest.raises(ValueError, match="as many queries"):
        pair_ranks(queries, gallery[:2])


def test_recall_metrics_by_hand():
    m = recall_metrics(torch.tensor([1, 2, 6, 11]))
    assert (m["R@1"], m["R@5"], m["R@10"]) == (0.25, 0.5, 0.75)
    assert m["median_rank"] == 4.0                      # the mean of the two middle ranks 2 and 6
    assert m["mrr"] == pytest.approx((1 + 1 / 2 + 1 / 6 + 1 / 11) / 4)
    assert recall_metrics(torch.tensor([3, 1, 2]))["median_rank"] == 2.0


def test_duplicates_are_one_item_in_paired_retrieval():
    # clips 0 and 1 share one caption (identical text vectors); clip 2 has its own
    audio = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]])
    text = torch.tensor([[1.0, 0.05], [1.0, 0.05], [0.0, 1.0]])
    groups = find_duplicates(audio, text).group.tolist()
    assert groups[0] == groups[1] != groups[2]
    m = paired_retrieval(audio, text, "audio", "text")
    # audio 0 and 1 find the shared caption first; without grouping audio 1 would rank 2 (the tie)
    assert pair_ranks(audio, text).tolist() == [2, 2, 1]
    assert m["audio->text/R@1"] == 1.0 and m["audio->text/mAP"] == pytest.approx(1.0)
    # the shared caption finds clip 0 first (its best), clip 1 second: AP (1 + 1) / 2 = 1
    assert m["text->audio/R@1"] == 1.0 and m["text->audio/mAP"] == pytest.approx(1.0)
    # the gallery holds the 2 distinct captions: chance R@1 = 1/2 for every clip
    assert m["audio->text/chance/R@1"] == pytest.approx(1 / 2)
    # the 2 distinct captions query 3 clips; the shared one has 2 relevant: mean(2/3, 1/3)
    assert m["text->audio/chance/R@1"] == pytest.approx(1 / 2)
    assert m["audio->text/chance/R@5"] == 1.0


def test_duplicate_groups_are_transitive():
    a = torch.tensor([[0.0], [0.0], [1.0], [2.0]])     # pairs 0 and 1 share their a side
    b = torch.tensor([[5.0], [6.0], [6.0], [7.0]])     # pairs 1 and 2 share their b side
    groups = find_duplicates(a, b).group.tolist()
    assert groups[0] == groups[1] == groups[2] != groups[3]
    keyed = find_duplicates(["clip1", "clip1", "clip2", "clip3"], ["cap1", "cap2", "cap2", "cap3"])
    assert keyed.group.tolist() == groups
    assert keyed.item_a.tolist() == [0, 0, 1, 2] and keyed.item_b.tolist() == [0, 1, 1, 2]


def test_duplicates_by_content_when_vectors_differ_in_the_last_bits():
    # the same caption encoded in two batches: equal content, vectors a rounding error apart
    audio = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]])
    text = torch.tensor([[1.0, 0.05], [1.0, 0.05 + 1e-7], [0.0, 1.0]])
    by_vector = paired_retrieval(audio, text, "audio", "text")
    duplicates = find_duplicates(["a.wav", "b.wav", "c.wav"], ["a dog", "a dog", "rain"])
    by_content = paired_retrieval(audio, text, "audio", "text", duplicates=duplicates)
    assert by_vector["audio->text/R@1"] == pytest.approx(1 / 3)   # two captions tie: pessimistic ranks 2, 2, 1
    assert by_content["audio->text/R@1"] == 1.0 and by_content["audio->text/chance/R@1"] == pytest.approx(1 / 2)


def test_class_level_retrieval_by_hand():
    audio = unit(0.9, 0.8, 0.1, 0.7)                    # scores against text[0] = [1, 0]
    text = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8], [0.8, 0.6]])
    labels = ["dog", "cat", "dog", None]                # the unlabelled pair is left out of class level
    m = paired_retrieval(audio, text, "audio", "text", labels=labels)
    # text 0 ("dog") queries audio 0, 1, 2 (scores .9, .8, .1): dogs are audio 0 and 2 -> ranks 1 and 3
    # text 1 ("cat") has scores .44, .6, .99 -> cat audio 1 ranks 2
    # text 2 ("dog") has scores .89, .96, .14 -> dogs at ranks 2 and 3
    assert m["text->audio/class/R@1"] == pytest.approx(1 / 3)
    assert m["text->audio/class/mAP"] == pytest.approx(((1 + 2 / 3) / 2 + 1 / 2 + (1 / 2 + 2 / 3) / 2) / 3)
    # 2 dogs and 1 cat among 3: chance R@1 = mean(2/3, 1/3, 2/3)
    assert m["text->audio/class/chance/R@1"] == pytest.approx(5 / 9)
    assert "audio->text/class/R@1" in m and "audio->text/R@1" in m
    assert mean_recall_at_1(m) == pytest.approx((m["audio->text/R@1"] + m["text->audio/R@1"]) / 2)


def test_chance_levels_match_every_random_ranking():
    for n, m in ((4, 1), (4, 2), (5, 3)):
        aps, hits = [], {k: [] for k in (1, 2, 3)}
        for order in itertools.permutations(range(n)):     # relevant items are 0..m-1
            ranks = sorted(order.index(i) + 1 for i in range(m))
            aps.append(sum((j + 1) / r for j, r in enumerate(ranks)) / m)
            for k in hits:
                hits[k].append(ranks[0] <= k)
        relevant = torch.tensor([m])
        assert chance_average_precision(relevant, n) == pytest.approx(sum(aps) / len(aps))
        for k, h in hits.items():
            assert chance_recall(relevant, n, k) == pytest.approx(sum(h) / len(h))
    assert chance_recall(torch.tensor([1]), 50, 5) == pytest.approx(5 / 50)
    harmonic = sum(1 / i for i in range(1, 51))
    assert chance_average_precision(torch.tensor([1]), 50) == pytest.approx(harmonic / 50)


def brute_force(q: torch.Tensor, g: torch.Tensor, ql: torch.Tensor, gl: torch.Tensor):
    """The definition, one query at a time over the full similarity matrix."""
    sims = F.normalize(q.float(), dim=-1) @ F.normalize(g.float(), dim=-1).T
    firsts, aps = [], []
    for i in range(q.shape[0]):
        relevant = gl == ql[i]
        scores = sorted(sims[i][relevant].tolist(), reverse=True)
        ranks = [j + int(((sims[i] >= s - TIE_TOLERANCE) & ~relevant).sum()) for j, s in enumerate(scores, 1)]
        firsts.append(ranks[0])
        aps.append(sum(j / r for j, r in enumerate(ranks, 1)) / len(ranks))
    return torch.tensor(firsts), torch.tensor(aps)


@pytest.mark.parametrize("classes", [1, 2, 5, 40])
def test_chunked_engine_is_exact(classes):
    g = torch.Generator().manual_seed(classes)
    n_g, n_q = 37, 23
    gallery = torch.randint(-2, 3, (n_g, 3), generator=g).float()   # few distinct directions: many ties
    gallery[gallery.abs().sum(dim=1) == 0] = 1.0
    queries = torch.randint(-2, 3, (n_q, 3), generator=g).float()
    queries[queries.abs().sum(dim=1) == 0] = 1.0
    gl = torch.randint(0, classes, (n_g,), generator=g)
    ql = gl[torch.randint(0, n_g, (n_q,), generator=g)]
    first, ap = brute_force(queries, gallery, ql, gl)
    for chunk in (1, 2, 5, 1024):                                    # blocks from one row to everything
        r = rank_gallery(queries, gallery, ql, gl, chunk_size=chunk)
        assert torch.equal(r.first_rank, first), chunk
        assert torch.allclose(r.average_precision, ap), chunk


def test_engine_refuses_queries_without_a_relevant_item():
    with pytest.raises(ValueError, match="no relevant"):
        rank_gallery(QUERY, unit(0.5), torch.tensor([1]), torch.tensor([0]))


def test_mean_recall_at_1_reads_only_instance_recall():
    metrics = {"a->b/R@1": 0.2, "b->a/R@1": 0.4, "a->b/chance/R@1": 0.5, "a->b/class/R@1": 0.9, "mean_r1": 0.0}
    assert mean_recall_at_1(metrics) == pytest.approx(0.3)
    assert math.isnan(mean_recall_at_1({}))


def test_a_gallery_of_repeated_captions_ranks_each_caption_once():
    # six clips, two distinct captions ("seven" for clips 0-2, "two" for clips 3-5), each caption three times
    seven, two = [1.0, 0.0], [0.0, 1.0]
    text = torch.tensor([seven] * 3 + [two] * 3)
    audio = torch.tensor([[1.0, 0.1], [0.2, 1.0], [1.0, 0.5], [0.1, 1.0], [1.0, 0.2], [0.3, 1.0]])
    m = paired_retrieval(audio, text, "audio", "text")
    # audio->text: the gallery is the 2 distinct captions; clips 1 and 4 are closer to the other caption
    assert m["audio->text/R@1"] == pytest.approx(4 / 6)
    assert m["audio->text/mrr"] == pytest.approx((4 + 2 * 0.5) / 6)        # 5/6, not 0.75 (copies ahead: rank 4)
    assert m["audio->text/mAP"] == pytest.approx(5 / 6)
    assert m["audio->text/median_rank"] == 1.0
    assert m["audio->text/chance/R@1"] == pytest.approx(1 / 2)
    assert m["audio->text/chance/mAP"] == pytest.approx(1.5 / 2)            # H_2 / 2
    # text->audio: 2 distinct queries over 6 clips; "seven" scores s0 .995, t1 .981, s2 .894, t2 .287, s1 .196,
    # t0 .0995 -> its clips at ranks 1, 3, 5; "two" is the mirror image
    assert m["text->audio/R@1"] == 1.0
    assert m["text->audio/mAP"] == pytest.approx((1 + 2 / 3 + 3 / 5) / 3)
    assert m["text->audio/chance/R@1"] == pytest.approx(3 / 6)


def test_a_clip_with_several_captions_is_one_query_and_finds_any_of_them():
    # clip A has two different captions, clip B one
    text = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]])           # "dog barks", "a dog", "rain"
    audio = torch.tensor([[0.8, 0.6], [0.8, 0.6], [0.6, 0.8]])          # A, A, B
    by_key = find_duplicates(["A.wav", "A.wav", "B.wav"], ["dog barks", "a dog", "rain"])
    for duplicates in (None, by_key):
        m = paired_retrieval(audio, text, "audio", "text", duplicates=duplicates)
        # A scores "a dog" .96, "dog barks" .8, "rain" .6: both its captions first (AP 1);
        # B scores "a dog" 1.0 before its "rain" .8: rank 2 (AP 1/2)
        assert m["audio->text/R@1"] == pytest.approx(1 / 2)
        assert m["audio->text/mAP"] == pytest.approx(3 / 4)
        assert m["audio->text/chance/R@1"] == pytest.approx((2 / 3 + 1 / 3) / 2)
        # the gallery of text->audio is the 2 distinct clips: "a dog" scores B 1.0 before A .96
        assert m["text->audio/R@1"] == pytest.approx(2 / 3)
        assert m["text->audio/mrr"] == pytest.approx((1 + 1 / 2 + 1) / 3)
        assert m["text->audio/chance/R@1"] == pytest.approx(1 / 2)


def test_shared_captions_and_several_captions_at_once():
    # pairs (A, dog), (A, bark), (B, dog), (C, rain), (D, rain): groups {A, B, dog, bark} and {C, D, rain}
    vectors = {"A": [1.0, 0.2], "B": [0.1, 1.0], "C": [0.2, 1.0], "D": [0.9, 0.5],
               "dog": [1.0, 0.0], "bark": [0.8, 0.6], "rain": [0.0, 1.0]}
    clips, captions = ["A", "A", "B", "C", "D"], ["dog", "bark", "dog", "rain", "rain"]
    audio = torch.tensor([vectors[c] for c in clips])
    text = torch.tensor([vectors[c] for c in captions])
    duplicates = find_duplicates(clips, captions)
    assert duplicates.group.tolist()[:3] == [duplicates.group[0].item()] * 3 != duplicates.group.tolist()[3:]
    for given in (None, duplicates):
        m = paired_retrieval(audio, text, "audio", "text", duplicates=given)
        # audio->text over 3 distinct captions: A finds dog, bark (ranks 1, 2); B: rain, bark, dog (2, 3);
        # C: rain first; D: bark, dog, rain (3)
        assert m["audio->text/R@1"] == pytest.approx(2 / 4)
        assert m["audio->text/mrr"] == pytest.approx((1 + 1 / 2 + 1 + 1 / 3) / 4)
        assert m["audio->text/mAP"] == pytest.approx((1 + (1 / 2 + 2 / 3) / 2 + 1 + 1 / 3) / 4)
        assert m["audio->text/chance/R@1"] == pytest.approx((2 / 3 + 2 / 3 + 1 / 3 + 1 / 3) / 4)
        # text->audio over 4 distinct clips: dog A D C B (ranks 1, 4); bark D A C B (2, 4); rain B C D A (2, 3)
        assert m["text->audio/R@1"] == pytest.approx(1 / 3)
        assert m["text->audio/mAP"] == pytest.approx(((1 + 2 / 4) / 2 + (1 / 2 + 2 / 4) / 2 + (1 / 2 + 2 / 3) / 2) / 3)
        assert m["text->audio/chance/R@1"] == pytest.approx(1 / 2)


def test_class_level_retrieval_counts_identical_items_once():
    # two clips share the caption "a dog"; class level ranks the 2 distinct captions, not 3 rows
    audio = torch.tensor([[1.0, 0.1], [0.9, 0.3], [0.1, 1.0]])
    text = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    m = paired_retrieval(audio, text, "audio", "text", labels=["dog", "dog", "cat"])
    assert m["audio->text/class/chance/R@1"] == pytest.approx(1 / 2)
    assert m["text->audio/class/chance/R@1"] == pytest.approx((2 / 3 + 1 / 3) / 2)
