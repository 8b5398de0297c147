"""Findings task catalog: one prompt rendering for training and serving, and answer parsing."""

from __future__ import annotations

import json

import pytest

from services.findings import catalog
from services.findings.answers import ABSENT, PRESENT, UNPARSEABLE, parse_answer, parse_segments

# The two prompts CMR-VL published (EstelleXIA/CMR-VL README.md, commit b9a444d, VQA examples),
# copied from that file: the catalog must reproduce them byte for byte.
CMR_VL_EFFUSION = ("<image><image><image><image><image><image><image><image><image><image>"
                   "Is there any pericardial effusion present?")
CMR_VL_MOTION = ("<video>Is the wall motion of the ventricles coordinated? If abnormalities in wall motion "
                 "are observed in various segments, report the abnormal segments and the abnormal motion "
                 "patterns.")


def test_published_prompts_are_byte_identical():
    assert catalog.build_user_message("pericardial_effusion").encode() == CMR_VL_EFFUSION.encode()
    assert catalog.build_user_message("wall_motion").encode() == CMR_VL_MOTION.encode()


def test_every_task_renders_its_placeholder_count():
    cat = catalog.load_catalog()
    assert cat.version == catalog.CATALOG_VERSION
    assert len(set(cat.ids())) == len(cat.tasks) >= 5
    for task in cat.tasks:
        message = task.prompt
        n_img, n_vid = message.count("<image>"), message.count("<video>")
        assert (n_vid, n_img) == ((1, 0) if task.is_video else (0, task.n_visuals)), task.id
        assert message.endswith(task.question) and task.question.strip() == task.question
        assert task.prompt_source


def test_wrong_number_of_visuals_is_refused():
    with pytest.raises(ValueError, match="takes 10"):
        catalog.build_user_message("pericardial_effusion", 9)
    with pytest.raises(ValueError):
        catalog.build_sharegpt_sample("wall_motion", ["a.mp4", "b.mp4"], "x")
    with pytest.raises(KeyError):
        catalog.get_task("no_such_task")


def test_training_sample_and_serving_content_share_one_rendering():
    """The training builder (sharegpt JSON) and the VLM client (OpenAI content parts) must carry the
    same user turn: both go through build_user_message."""
    for task in catalog.load_catalog().tasks:
        paths = [f"study/{task.id}_{i}" for i in range(task.n_visuals)]
        sample = catalog.build_sharegpt_sample(task, paths, "answer")
        # LLaMA-Factory sharegpt layout of the CMR-VL README
        assert [m["role"] for m in sample["messages"]] == ["user", "assistant"]
        assert sample["videos" if task.is_video else "images"] == paths
        assert sample["images" if task.is_video else "videos"] == []
        parts = catalog.build_openai_content(task, [f"s3://b/{p}" for p in paths])
        assert catalog.join_parts(parts) == sample["messages"][0]["content"] == catalog.build_user_message(task)
        media = [p for p in parts if p["type"] != "text"]
        assert [p[p["type"]]["url"] for p in media] == [f"s3://b/{p}" for p in paths]
        assert parts[-1] == {"type": "text", "text": task.question}
        json.dumps(sample)  # serialisable as a dataset line


def test_fingerprint_is_the_file_hash():
    import hashlib
    from pathlib import Path

    data = (Path(catalog.__file__).parent / "tasks_v1.json").read_bytes()
    assert catalog.load_catalog().fingerprint == hashlib.sha256(data).hexdigest()


def test_visual_specs_are_complete():
    """Sizes and counts live in the catalog only; builders read them from there."""
    for task in catalog.load_catalog().tasks:
        v = task.visual
        assert int(v["size_px"]) % 28 == 0  # whole Qwen2.5-VL patches after 2x2 merge: no resize
        assert int(v["size_px"]) ** 2 <= 147456  # image_resolution of CMR-VL's training yaml
        if task.is_video:
            n_frames = int(v["slices"]) * int(v["frames_per_cycle"])
            assert n_frames <= 128 and n_frames % 2 == 0  # LLaMA-Factory video_maxlen; Qwen temporal patch 2
            assert int(v["fps"]) == 4  # video_fps of qwen2_5vl_sft_train.yaml
            assert int(v["size_px"]) ** 2 <= 65536  # video_resolution


# --- answers ----------------------------------------------------------------------------------

@pytest.mark.parametrize("text", [None, "", "   ", 42, b"bytes", ["list"], "asdf qwerty", "<|im_end|>",
                                  "The left ventricle is large."])
def test_malformed_output_is_unparseable_not_a_crash(text):
    for task in catalog.load_catalog().tasks:
        finding = parse_answer(task, text)
        assert finding.status == UNPARSEABLE, (task.id, text)
        assert finding.reason and finding.task_id == task.id


def test_contradictory_answer_is_unparseable():
    f = parse_answer("pericardial_effusion", "No pericardial effusion. A large pericardial effusion is present.")
    assert f.status == UNPARSEABLE


@pytest.mark.parametrize("text,status,grade", [
    ("There is a small amount of pericardial effusion.", PRESENT, "small"),  # CMR-VL README example
    ("A moderate pericardial effusion, no signs of tamponade.", PRESENT, "moderate"),
    ("Large pericardial effusion surrounding the heart.", PRESENT, "large"),
    ("No pericardial effusion.", ABSENT, None),
    ("There is no evidence of pericardial effusion.", ABSENT, None),
])
def test_effusion_answers(text, status, grade):
    f = parse_answer("pericardial_effusion", text)
    assert (f.status, f.grade) == (status, grade)


def test_wall_motion_answers():
    readme = ("The left ventricular apex shows thinning, with decreased wall motion and significantly reduced "
              "contractile function, and there is paradoxical motion at the apex.")  # CMR-VL README example
    f = parse_answer("wall_motion", readme)
    assert f.status == PRESENT and f.grade == "dyskinesis" and f.segments == [17]
    assert f.patterns == ["dyskinesis", "hypokinesis"]
    f = parse_answer("wall_motion", "Hypokinesis of the basal to mid anterior and anteroseptal walls; "
                                    "akinesis of the apical inferior segment.")
    assert f.status == PRESENT and f.grade == "akinesis" and f.segments == [1, 2, 7, 8, 15]
    assert parse_answer("wall_motion", "The wall motion of the ventricles is coordinated.").status == ABSENT
    assert parse_answer("wall_motion", "No regional wall motion abnormality.").status == ABSENT


def test_lge_edema_thrombus_answers():
    f = parse_answer("lge", "Transmural late gadolinium enhancement in the mid anteroseptal wall and the apex, "
                            "with microvascular obstruction.")
    assert f.status == PRESENT and f.segments == [8, 17] and f.patterns == ["transmural", "mvo"]
    assert parse_answer("lge", "No abnormal late gadolinium enhancement.").status == ABSENT
    f = parse_answer("myocardial_edema", "Myocardial edema in the basal and mid inferior wall.")
    assert f.status == PRESENT and f.segments == [4, 10]
    assert parse_answer("myocardial_edema", "No myocardial edema.").status == ABSENT
    assert parse_answer("lv_thrombus", "A thrombus is seen at the left ventricular apex.").segments == [17]
    assert parse_answer("lv_thrombus", "There is no thrombus in the left ventricle.").status == ABSENT


def test_segment_names():
    assert parse_segments("inferolateral wall") == [5, 11, 16]
    assert parse_segments("basal inferoseptum and mid inferior septal wall") == [3, 9]
    assert parse_segments("basal inferior and mid anterior walls") == [4, 7]
    assert parse_segments("mid anteroseptum") == [8]
    assert parse_segments("apical lateral") == [16]
    assert parse_segments("septum") == [2, 3, 8, 9, 14]


def test_finding_serialises():
    d = parse_answer("lge", "Subendocardial enhancement of the basal inferior wall.").to_dict()
    assert d["status"] == PRESENT and d["segments"] == [4] and d["patterns"] == ["subendocardial"]
    assert d["catalog_version"] == catalog.CATALOG_VERSION
    json.dumps(d)
