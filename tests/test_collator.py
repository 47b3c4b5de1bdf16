"""The collator against the masking rules of the paper and the authors' code."""

import pytest
import torch

from retromae import RetroMAECollator

from conftest import TEXTS, UNKNOWN_TEXTS, decoder_mask


def word_spans(tokenizer, ids):
    """(start, end) token spans of the whole words in one sequence: a token plus its ## continuations."""
    tokens = tokenizer.convert_ids_to_tokens(ids)
    spans = []
    for position, token in enumerate(tokens):
        if token in tokenizer.all_special_tokens:
            continue
        if token.startswith("##") and spans:
            spans[-1][1] = position + 1
        else:
            spans.append([position, position + 1])
    return spans


@pytest.fixture
def collator(tokenizer):
    return RetroMAECollator(tokenizer, max_length=64, seed=0)


@pytest.fixture
def many_batches(collator):
    batches = []
    for epoch in range(25):
        collator.set_epoch(epoch)
        batches.append(collator(TEXTS * 4))
    return batches


def special_positions(tokenizer, batch):
    ids = batch["decoder_input_ids"]
    special = torch.isin(ids, torch.tensor(tokenizer.all_special_ids))
    return special, batch["encoder_attention_mask"].bool()


def test_batch_has_its_tensors_with_their_shapes_and_no_dense_mask(collator):
    batch = collator(TEXTS)
    batch_size, seq = batch["encoder_input_ids"].shape
    assert set(batch) == {
        "encoder_input_ids",
        "encoder_attention_mask",
        "encoder_labels",
        "decoder_input_ids",
        "decoder_labels",
        "decoder_word_ids",
        "decoder_mask_seeds",
        "decoder_mask_budget",
        "decoder_row_patterns",
    }
    for name in ("encoder_attention_mask", "encoder_labels", "decoder_input_ids", "decoder_labels", "decoder_word_ids", "decoder_row_patterns"):
        assert batch[name].shape == (batch_size, seq)
    assert batch["decoder_mask_seeds"].shape == batch["decoder_mask_budget"].shape == (batch_size,)
    assert decoder_mask(batch).shape == (batch_size, seq, seq)
    assert decoder_mask(batch).dtype == torch.bool


def test_decoder_input_is_the_original_unmasked_text(collator, tokenizer):
    batch = collator(TEXTS)
    expected = tokenizer(TEXTS, padding=True, truncation=True, max_length=64, return_tensors="pt")["input_ids"]
    assert torch.equal(batch["decoder_input_ids"], expected)


def test_encoder_mask_ratio_is_met_over_many_draws(many_batches, tokenizer):
    masked = content = 0
    for batch in many_batches:
        special, real = special_positions(tokenizer, batch)
        masked += (batch["encoder_labels"] != -100).sum().item()
        content += (real & ~special).sum().item()
    assert masked / content == pytest.approx(0.30, abs=0.03)


def test_decoder_mask_ratio_is_met_over_many_draws(many_batches, tokenizer):
    hidden = total = 0
    for batch in many_batches:
        special, real = special_positions(tokenizer, batch)
        content = real & ~special  # (batch, seq)
        seq = content.shape[1]
        not_self = ~torch.eye(seq, dtype=torch.bool)
        rows = real[:, :, None] & content[:, None, :] & not_self  # content columns, real rows, off-diagonal
        hidden += (~decoder_mask(batch) & rows).sum().item()
        total += rows.sum().item()
    assert hidden / total == pytest.approx(0.50, abs=0.04)


def test_encoder_replaces_chosen_tokens_bert_style(many_batches, tokenizer):
    chosen_total = as_mask = unchanged = 0
    for batch in many_batches:
        chosen = batch["encoder_labels"] != -100
        chosen_total += chosen.sum().item()
        as_mask += (chosen & (batch["encoder_input_ids"] == tokenizer.mask_token_id)).sum().item()
        unchanged += (chosen & (batch["encoder_input_ids"] == batch["decoder_input_ids"])).sum().item()
    assert as_mask / chosen_total == pytest.approx(0.8, abs=0.04)
    assert unchanged / chosen_total == pytest.approx(0.1, abs=0.03)


def test_encoder_leaves_unchosen_tokens_alone_and_labels_them_ignored(collator):
    batch = collator(TEXTS)
    unchosen = batch["encoder_labels"] == -100
    assert torch.equal(batch["encoder_input_ids"][unchosen], batch["decoder_input_ids"][unchosen])
    chosen = ~unchosen
    assert torch.equal(batch["encoder_labels"][chosen], batch["decoder_input_ids"][chosen])


def test_encoder_masks_whole_words_together(many_batches, tokenizer):
    split_words = 0
    for batch in many_batches:
        for row, ids in enumerate(batch["decoder_input_ids"].tolist()):
            chosen = (batch["encoder_labels"][row] != -100).tolist()
            for start, end in word_spans(tokenizer, ids):
                split_words += end - start > 1
                assert len(set(chosen[start:end])) == 1
    assert split_words > 0


def test_decoder_hides_whole_words_together(collator, tokenizer):
    batch = collator(TEXTS)
    for row, ids in enumerate(batch["decoder_input_ids"].tolist()):
        visible = decoder_mask(batch)[row]
        for query in range(len(tokenizer.convert_ids_to_tokens(ids))):
            for start, end in word_spans(tokenizer, ids):
                if start <= query < end:
                    continue
                assert len(set(visible[query, start:end].tolist())) == 1


def test_special_tokens_and_padding_are_never_masked_for_the_encoder(many_batches, tokenizer):
    for batch in many_batches:
        special, real = special_positions(tokenizer, batch)
        never = special | ~real
        assert (batch["encoder_labels"][never] == -100).all()
        assert torch.equal(batch["encoder_input_ids"][never], batch["decoder_input_ids"][never])


def test_decoder_row_never_sees_its_own_token(many_batches):
    for batch in many_batches:
        assert not decoder_mask(batch).diagonal(dim1=1, dim2=2).any()


def test_decoder_rows_see_the_sentence_embedding_and_sep(many_batches, tokenizer):
    for batch in many_batches:
        mask = decoder_mask(batch)
        assert mask[:, 1:, 0].all()
        sep = batch["decoder_input_ids"] == tokenizer.sep_token_id
        rows, columns = sep.nonzero(as_tuple=True)
        for row, column in zip(rows.tolist(), columns.tolist()):
            others = torch.arange(mask.shape[1]) != column
            assert mask[row, others, column].all()


def test_decoder_never_attends_to_padding(collator):
    batch = collator(TEXTS)
    padding = ~batch["encoder_attention_mask"].bool()
    assert not (decoder_mask(batch) & padding[:, None, :]).any()
    assert padding.any()


def test_decoder_rows_draw_different_patterns(collator):
    batch = collator(TEXTS)
    rows = decoder_mask(batch)[2, 1:20]
    assert len({tuple(row.tolist()) for row in rows}) > 10


def test_decoder_labels_cover_every_non_special_token(collator, tokenizer):
    batch = collator(TEXTS)
    special, real = special_positions(tokenizer, batch)
    content = real & ~special
    assert torch.equal(batch["decoder_labels"][content], batch["decoder_input_ids"][content])
    assert (batch["decoder_labels"][~content] == -100).all()


def test_seeded_masks_depend_only_on_seed_epoch_and_batch(tokenizer):
    collator = RetroMAECollator(tokenizer, seed=7)
    first, other_batch, again = collator(TEXTS), collator(TEXTS[::-1]), collator(TEXTS)
    assert torch.equal(decoder_mask(first), decoder_mask(again))
    assert not torch.equal(first["encoder_labels"], other_batch["encoder_labels"][list(range(len(TEXTS)))[::-1]])
    collator.set_epoch(1)
    assert not torch.equal(decoder_mask(first), decoder_mask(collator(TEXTS)))


def test_unseeded_masks_follow_torch_global_generator(tokenizer):
    collator = RetroMAECollator(tokenizer)
    torch.manual_seed(5)
    first = collator(TEXTS)
    second = collator(TEXTS)
    torch.manual_seed(5)
    assert torch.equal(decoder_mask(first), decoder_mask(collator(TEXTS)))
    assert not torch.equal(decoder_mask(first), decoder_mask(second))


def test_every_sequence_gets_at_least_one_masked_token(tokenizer):
    collator = RetroMAECollator(tokenizer, encoder_mask_ratio=0.01, seed=0)
    batch = collator(["a b", "hello", "one two three"])
    assert ((batch["encoder_labels"] != -100).sum(1) >= 1).all()


def test_same_seed_gives_the_same_batch(tokenizer):
    first = RetroMAECollator(tokenizer, seed=7)(TEXTS)
    second = RetroMAECollator(tokenizer, seed=7)(TEXTS)
    other = RetroMAECollator(tokenizer, seed=8)(TEXTS)
    for name in first:
        assert torch.equal(first[name], second[name])
    assert not torch.equal(decoder_mask(first), decoder_mask(other))


def test_token_ids_give_the_same_batch_as_text(tokenizer):
    with_specials = tokenizer(TEXTS)["input_ids"]
    without_specials = tokenizer(TEXTS, add_special_tokens=False)["input_ids"]
    from_text = RetroMAECollator(tokenizer, seed=3)(TEXTS)
    for ids in (with_specials, without_specials, [{"input_ids": i} for i in with_specials]):
        from_ids = RetroMAECollator(tokenizer, seed=3)(ids)
        for name in from_text:
            assert torch.equal(from_text[name], from_ids[name])


def test_dicts_with_text_are_accepted(tokenizer):
    from_text = RetroMAECollator(tokenizer, seed=3)(TEXTS)
    from_dicts = RetroMAECollator(tokenizer, seed=3)([{"text": t} for t in TEXTS])
    assert torch.equal(from_text["decoder_input_ids"], from_dicts["decoder_input_ids"])


def test_long_sequences_are_truncated_keeping_sep(tokenizer):
    collator = RetroMAECollator(tokenizer, max_length=8, seed=0)
    batch = collator([TEXTS[2], list(range(1000, 1100))])
    assert batch["decoder_input_ids"].shape[1] == 8
    assert (batch["decoder_input_ids"][:, -1] == tokenizer.sep_token_id).all()


@pytest.mark.parametrize(
    "examples, error, words",
    [
        ([], ValueError, "non-empty list"),
        ("a single string", ValueError, "non-empty list"),
        (["fine", "   "], ValueError, "Example 1 is empty"),
        (["fine", None], TypeError, "Example 1 is a NoneType"),
        ([3.5], TypeError, "Example 0 is a float"),
        ([[101, 102]], ValueError, "Example 0 holds only special tokens"),
        (["ok", {"label": 1}], TypeError, "Example 1 is a NoneType"),
    ],
)
def test_bad_examples_raise_an_error_naming_the_example(collator, examples, error, words):
    with pytest.raises(error, match=words):
        collator(examples)


@pytest.mark.parametrize("name", ["encoder_mask_ratio", "decoder_mask_ratio"])
@pytest.mark.parametrize("ratio", [0.0, 1.0, 1.5, -0.2])
def test_ratios_outside_zero_one_are_refused(tokenizer, name, ratio):
    with pytest.raises(ValueError, match=f"{name} must lie strictly between 0 and 1, got {ratio}"):
        RetroMAECollator(tokenizer, **{name: ratio})


def test_without_enhanced_decoding_the_decoder_reads_a_masked_copy(tokenizer):
    """The paper's ablation: same encoder side; the decoder copy masked at its ratio, labelled there, padding-only mask."""
    enhanced = RetroMAECollator(tokenizer, max_length=64, seed=0)
    ablation = RetroMAECollator(tokenizer, max_length=64, seed=0, decoder_mask_ratio=0.5, enhanced_decoding=False)
    masked = content = 0
    for epoch in range(25):
        enhanced.set_epoch(epoch), ablation.set_epoch(epoch)
        reference, batch = enhanced(TEXTS * 4), ablation(TEXTS * 4)
        for name in ("encoder_input_ids", "encoder_attention_mask", "encoder_labels"):
            assert torch.equal(batch[name], reference[name])
        original = reference["decoder_input_ids"]
        chosen = batch["decoder_labels"] != -100
        assert torch.equal(batch["decoder_labels"][chosen], original[chosen])
        assert torch.equal(batch["decoder_input_ids"][~chosen], original[~chosen])
        assert (batch["decoder_input_ids"][chosen] == tokenizer.mask_token_id).float().mean() > 0.6
        real = batch["encoder_attention_mask"].bool()
        assert torch.equal(decoder_mask(batch), real[:, None, :].expand_as(decoder_mask(batch)))
        special, _ = special_positions(tokenizer, reference)
        masked += chosen.sum().item()
        content += (real & ~special).sum().item()
    assert masked / content == pytest.approx(0.50, abs=0.04)


@pytest.fixture
def unknown_batches(collator):
    """Batches of text with [UNK] (and all-[UNK] passages) over 25 epochs of masks."""
    batches = []
    for epoch in range(25):
        collator.set_epoch(epoch)
        batches.append(collator(UNKNOWN_TEXTS + TEXTS))
    return batches


def test_unknown_tokens_are_rebuilt_by_the_decoder_and_never_masked_by_the_encoder(unknown_batches, tokenizer):
    for batch in unknown_batches:
        unknown = batch["decoder_input_ids"] == tokenizer.unk_token_id
        assert (batch["decoder_labels"][unknown] == tokenizer.unk_token_id).all()
        assert (batch["encoder_labels"][unknown] == -100).all()
        assert (batch["encoder_input_ids"][unknown] == tokenizer.unk_token_id).all()
        assert (batch["encoder_labels"][~unknown] != -100).any()
    assert unknown[: len(UNKNOWN_TEXTS)].any(1).all()


def test_decoder_patterns_may_hide_unknown_tokens(unknown_batches, tokenizer):
    """Each row hides [UNK] as often as any other token: at the decoder's ratio."""
    hidden = total = 0
    for batch in unknown_batches:
        unknown = batch["decoder_input_ids"] == tokenizer.unk_token_id  # (batch, seq)
        real = batch["encoder_attention_mask"].bool()
        seq = unknown.shape[1]
        rows = real[:, :, None] & unknown[:, None, :] & ~torch.eye(seq, dtype=torch.bool)
        hidden += (~decoder_mask(batch) & rows).sum().item()
        total += rows.sum().item()
    assert hidden / total == pytest.approx(0.50, abs=0.05)


def authors_whole_words(tokens):
    """
    The whole-word candidates of the authors' code (transformers 4.34's `_whole_word_mask`, which
    their collator calls for the encoder and every decoder pattern): every token but "[CLS]" and
    "[SEP]", a "##" token joined to the word before; [UNK] is a word like any other.
    """
    words = []
    for position, token in enumerate(tokens):
        if token in ("[CLS]", "[SEP]"):
            continue
        if words and token.startswith("##"):
            words[-1].append(position)
        else:
            words.append([position])
    return words


def test_a_batch_with_unknown_tokens_follows_the_authors_rules(unknown_batches, tokenizer):
    """
    Re-derived from staoxiao/RetroMAE src/pretrain/data.py: decoder labels are the ids with the first
    and last token (and padding) at -100; the encoder's and each decoder row's masks take whole
    candidate words; the encoder's masking (transformers' `torch_mask_tokens`) then drops every
    special id, [UNK] included; a decoder row also hides its own position.
    """
    special = set(tokenizer.all_special_ids)
    for batch in unknown_batches:
        mask = decoder_mask(batch)
        for row, length in enumerate(batch["encoder_attention_mask"].sum(1).tolist()):
            ids = batch["decoder_input_ids"][row, :length].tolist()
            words = authors_whole_words(tokenizer.convert_ids_to_tokens(ids))
            expected_labels = [-100] + ids[1:-1] + [-100] + [-100] * (mask.shape[1] - length)
            assert batch["decoder_labels"][row].tolist() == expected_labels
            ours = batch["decoder_word_ids"][row, :length]
            assert sorted(words) == sorted((ours == word).nonzero().flatten().tolist() for word in ours.unique() if word >= 0)
            chosen = (batch["encoder_labels"][row, :length] != -100).tolist()
            assert not any(chosen[i] for i in range(length) if ids[i] in special)
            for word in words:
                spelled = [i for i in word if ids[i] not in special]
                assert len({chosen[i] for i in spelled}) <= 1
            for query in range(length):
                hidden = (~mask[row, query, :length]).tolist()
                assert hidden[query] and not any(hidden[i] for i in (0, length - 1) if i != query)
                for word in words:
                    assert len({hidden[i] for i in word if i != query}) <= 1
