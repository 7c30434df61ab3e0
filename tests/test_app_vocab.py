"""Text box → vocabulary: order, de-duplication, validation, presets, seen/novel marking."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from app.vocab import (
    BACKGROUND_NOTE,
    MAX_CLASSES,
    MAX_NAME_LENGTH,
    PRESETS,
    parse_vocabulary,
    preset_text,
)
from otseg.data.classes import CLASS_NAMES, seen_ids
from otseg.vocabulary import mark_seen, match_key

ASSETS = Path(__file__).resolve().parents[1] / "assets"


def test_commas_and_newlines_split_trim_and_keep_order():
    text = "  sky ,tree\n\nperson,\r\n  red   car  ,,"
    assert parse_vocabulary(text) == ["sky", "tree", "person", "red car"]


def test_duplicates_dropped_case_and_whitespace_insensitively_first_spelling_kept():
    text = "Cat, dog, CAT, dining  table, Dining Table, dog\ncat"
    assert parse_vocabulary(text) == ["Cat", "dog", "dining table"]


def test_order_is_never_sorted():
    names = ["zebra", "apple", "mango", "banana"]
    assert parse_vocabulary(", ".join(names)) == names


@pytest.mark.parametrize("text", ["", "   ", ",,\n ,", None])
def test_empty_vocabulary_rejected(text):
    with pytest.raises(ValueError, match="at least one class name"):
        parse_vocabulary(text)


def test_too_many_classes_rejected_with_limit_and_count():
    names = [f"class {i}" for i in range(MAX_CLASSES + 1)]
    assert len(parse_vocabulary(", ".join(names[:MAX_CLASSES]))) == MAX_CLASSES
    with pytest.raises(ValueError, match=f"{MAX_CLASSES + 1} class names given; the limit is"):
        parse_vocabulary(", ".join(names))


def test_duplicates_do_not_count_towards_the_limit():
    names = [f"class {i}" for i in range(MAX_CLASSES)]
    assert len(parse_vocabulary(", ".join(names + [n.upper() for n in names]))) == MAX_CLASSES


def test_long_name_rejected_and_message_states_limit():
    assert parse_vocabulary("a" * MAX_NAME_LENGTH) == ["a" * MAX_NAME_LENGTH]
    with pytest.raises(ValueError, match=f"the limit is {MAX_NAME_LENGTH}"):
        parse_vocabulary("cat, " + "b" * (MAX_NAME_LENGTH + 1))


@pytest.mark.parametrize("name", ["...", "-", "!?", "— –"])
def test_punctuation_only_rejected(name):
    with pytest.raises(ValueError, match="no letters or digits"):
        parse_vocabulary(f"cat, {name}")


@pytest.mark.parametrize("text", ["<b>cat</b>", "dog, <script>alert(1)</script>", "a > b"])
def test_markup_rejected(text):
    with pytest.raises(ValueError, match="markup is not allowed"):
        parse_vocabulary(text)


def test_control_characters_rejected():
    with pytest.raises(ValueError, match="control characters"):
        parse_vocabulary("cat\x00dog")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("cat, <b>", "Class name “<b>” contains “<” or “>”;"),
        ("cat, --", "Class name “--” has no letters or digits."),
        ("cat\x00dog", "Class name “cat\ufffddog” contains control characters."),
        ("x" * (MAX_NAME_LENGTH + 1), f"Class name “{'x' * 20}”… is {MAX_NAME_LENGTH + 1} "),
    ],
)
def test_messages_quote_names_plainly(text, message):
    with pytest.raises(ValueError) as info:
        parse_vocabulary(text)
    assert str(info.value).startswith(message)
    assert "'" not in str(info.value)


def test_unicode_and_digits_allowed():
    assert parse_vocabulary("Straße, 7-eleven sign, 猫") == ["Straße", "7-eleven sign", "猫"]


@pytest.mark.parametrize(("preset", "dataset"), list(PRESETS.items()))
def test_presets_round_trip_through_the_parser(preset, dataset):
    assert parse_vocabulary(preset_text(preset)) == list(CLASS_NAMES[dataset])
    assert preset_text(dataset) == preset_text(preset)


def test_unknown_preset_message_lists_choices():
    with pytest.raises(ValueError, match="VOC-20, Context-59, COCO-Stuff-171"):
        preset_text("ADE-150")


def test_match_key_ignores_case_spaces_hyphens_underscores():
    assert match_key("Dining table") == match_key("diningtable") == "diningtable"
    assert match_key("TV-monitor") == match_key("tv_monitor") == match_key("tvmonitor")
    assert match_key("potted plant") != match_key("plant")


def test_mark_seen_on_voc_split():
    train, seen = CLASS_NAMES["voc"], seen_ids("voc")
    names = ["Dining Table", "cat", "tv monitor", "sofa", "pottedplant", "spacesuit", "train"]
    # VOC unseen ids 15-19: pottedplant, sheep, sofa, train, tvmonitor
    assert mark_seen(names, train, seen) == [True, True, False, False, False, False, False]


def test_mark_seen_only_counts_ids_given_as_seen():
    train = ("cat", "dog", "fire hydrant")
    assert mark_seen(["Fire-Hydrant", "dog", "cat"], train, (2,)) == [True, False, False]
    assert mark_seen(["cat"], train, ()) == [False]


def test_mark_seen_rejects_out_of_range_ids():
    with pytest.raises(ValueError, match="out of range"):
        mark_seen(["cat"], ("cat",), (0, 3))


def test_background_note_explains_the_catch_all():
    assert "no background class" in BACKGROUND_NOTE
    assert "background" in BACKGROUND_NOTE and "other" in BACKGROUND_NOTE


def test_example_vocabularies_parse_and_files_exist():
    examples = json.loads((ASSETS / "examples.json").read_text())
    assert 4 <= len(examples["examples"]) <= 6
    train, seen = CLASS_NAMES[examples["seen_preset"]], seen_ids(examples["seen_preset"])
    for example in examples["examples"]:
        assert (ASSETS / example["file"]).is_file()
        names = parse_vocabulary(example["vocabulary"])
        flags = mark_seen(names, train, seen)
        assert any(flags) and not all(flags), example  # each mixes seen and novel names


def test_names_too_long_for_clip_are_refused_before_encoding():
    from app.vocab import MAX_NAME_TOKENS, clip_token_count

    assert clip_token_count("dining table") == 2
    assert parse_vocabulary("猫, " + "x" * 60) == ["猫", "x" * 60]  # 60 Latin letters: 15 tokens
    with pytest.raises(
        ValueError, match=f"is 120 CLIP tokens long; the limit is {MAX_NAME_TOKENS}"
    ):
        parse_vocabulary("cat, " + "ж" * 60)
