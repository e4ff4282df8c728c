import pytest
import torch
import torch.nn.functional as F

from rclip_core import text_embed as te
from rclip_core.data import class_lists as cl
from rclip_core.errors import RclipError
from rclip_core.text_encoder import TextEncoder


def test_clean_name_matches_the_original_rules():
    assert cl.clean_name("bible_(book)") == "bible book"
    assert cl.clean_name("hot dog, sausage") == "hot dog sausage"
    assert cl.clean_name("salad+plate") == "salad plate"
    assert cl.clean_name("tv") == "tv"


def test_ensemble_has_81_templates_starting_with_bare_name():
    assert len(te.ENSEMBLE_TEMPLATES) == 81 and len(set(te.ENSEMBLE_TEMPLATES)) == 81
    assert te.ENSEMBLE_TEMPLATES[0] == "{}." and te.SINGLE_TEMPLATE in te.ENSEMBLE_TEMPLATES


def test_embedding_averages_unnormalised_features_then_normalises(tiny_clip):
    enc = TextEncoder(tiny_clip)
    templates = ["a photo of a {}.", "{}.", "a drawing of the {}."]
    names = ["cat", "traffic_light"]
    done = []
    emb = te.embed_names(enc, names, templates=templates, batch_size=4, progress=done.append)
    with torch.no_grad():
        expected = torch.stack([enc([t.format(cl.clean_name(n)) for t in templates]).mean(0) for n in names])
    assert torch.allclose(emb.embeddings, F.normalize(expected, dim=-1), atol=1e-5)
    assert emb.names == names and emb.templates == templates and emb.model == enc.fingerprint()
    assert done[-1] == 2
    # batching does not change the result
    again = te.embed_names(enc, names, templates=templates, batch_size=1000)
    assert torch.allclose(again.embeddings, emb.embeddings, atol=1e-5)


def test_empty_names_and_bad_templates_are_errors(tiny_clip):
    enc = TextEncoder(tiny_clip)
    with pytest.raises(RclipError, match="empty"):
        te.embed_names(enc, [], templates=["{}"])
    with pytest.raises(RclipError, match="placeholder"):
        te.embed_names(enc, ["cat"], templates=["a photo"])


def test_file_round_trip_and_checks(tiny_clip, tmp_path):
    enc = TextEncoder(tiny_clip)
    emb = te.embed_names(enc, ["cat", "dog"], templates=["{}."], category_ids=[17, 18])
    path = te.save_embeddings(emb, tmp_path / "e.pt")
    back = te.load_embeddings(path, dim=emb.dim, fingerprint=enc.fingerprint())
    assert back.names == ["cat", "dog"] and back.category_ids == [17, 18]
    assert torch.allclose(back.embeddings.norm(dim=1), torch.ones(2))
    with pytest.raises(RclipError, match="already exists"):
        te.save_embeddings(emb, path)
    with pytest.raises(RclipError, match="dimension 32 does not match the model's 1024"):
        te.load_embeddings(path, dim=1024)
    with pytest.raises(RclipError, match="re-run `rclip embed`"):
        te.load_embeddings(path, fingerprint="D32-0000")
    with pytest.raises(RclipError, match="not found"):
        te.load_embeddings(tmp_path / "none.pt")
    (tmp_path / "junk.pt").write_text("junk")
    with pytest.raises(RclipError, match="not a readable"):
        te.load_embeddings(tmp_path / "junk.pt")


def test_bare_format_export_and_import(tiny_clip, tmp_path):
    emb = te.embed_names(TextEncoder(tiny_clip), ["cat", "dog"], templates=["{}."])
    te.export_bare(emb, tmp_path / "bare.pth")
    raw = torch.load(tmp_path / "bare.pth")
    assert isinstance(raw, torch.Tensor) and raw.shape == (2, emb.dim)
    back = te.import_bare(tmp_path / "bare.pth", ["cat", "dog"])
    assert torch.allclose(back.embeddings, emb.embeddings, atol=1e-6) and back.model == "imported"
    with pytest.raises(RclipError, match="bare"):
        te.load_embeddings(tmp_path / "bare.pth")
    with pytest.raises(RclipError, match="2 rows but 3 names"):
        te.import_bare(tmp_path / "bare.pth", ["a", "b", "c"])
    # The original squeezes a single concept to 1-D; importing it still works, un-normalised input is normalised.
    torch.save(torch.tensor([3.0, 4.0]), tmp_path / "one.pth")
    assert torch.allclose(te.import_bare(tmp_path / "one.pth", ["x"]).embeddings, torch.tensor([[0.6, 0.8]]))


def test_name_sources(tmp_path):
    f = tmp_path / "names.txt"
    f.write_text("cat,123\n\n  dog  \ntraffic light\n")
    assert cl.names_from_text(f) == ["cat", "dog", "traffic light"]
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(RclipError, match="empty"):
        cl.names_from_text(tmp_path / "empty.txt")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    with pytest.raises(RclipError, match="not UTF-8"):
        cl.names_from_text(tmp_path / "latin1.txt")
    import json

    (tmp_path / "ann.json").write_text(json.dumps({"categories": [{"id": 5, "name": "b"}, {"id": 2, "name": "a"}]}))
    assert cl.categories_from_json(tmp_path / "ann.json") == (["a", "b"], [2, 5])
    (tmp_path / "nocat.json").write_text("{}")
    with pytest.raises(RclipError, match="categories"):
        cl.categories_from_json(tmp_path / "nocat.json")


def test_builtin_lists():
    names, ids = cl.builtin_names("coco80")
    assert len(names) == 80 and ids[0] == 1 and "tv" in names
    assert len(cl.builtin_names("coco65")[0]) == 65
    assert len(cl.builtin_names("coco48")[0]) == 48 and len(cl.builtin_names("coco17")[0]) == 17
    assert len(cl.builtin_names("lvis1203")[0]) == 1203 and len(cl.builtin_names("lvis866")[0]) == 866
    with pytest.raises(RclipError, match="available"):
        cl.builtin_names("voc")
