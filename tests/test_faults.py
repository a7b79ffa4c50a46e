"""Fault injection (issue 22): kill -9 during checkpoint writes of both stages, then --resume,
bit-identical to an uninterrupted run; mixed and half-written checkpoints refused in one line; data
that holds no readable sample exits non-zero in seconds; fewer shards than readers; a shard set with
every kind of bad member trains to the end with each counted; the rank digest sees exact bits;
malformed LLaVA entries, escaping paths, shard names and configs from files refused or skipped before
any allocation; every command line answers a user's mistake in one line. CPU, tiny configs.

The kills are real SIGKILLs inside the checkpoint writer, at points chosen with the test-only
environment variable DUALTOKEN_TEST_KILL (tokenizer._test_kill)."""
import collections
import io
import json
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import tarfile
import time
import zlib
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import data as D
import tokenizer as T
import unified as U
from test_tokenizer_train import TINY_SIGLIP, teacher_dir  # noqa: F401 (a fixture)
from test_unified_model import TINY_MODEL_KW, tiny_config, tiny_tokenizer, train_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# tests/test_tokenizer_train.py's tiny stage 1, 4 steps with a checkpoint every 2
TOK = ["--preset", "shapes", "--sem_layer", "2", "--batch_size", "4", "--grad_accum", "2", "--disc_start", "1",
       "--warmup", "2", "--eval_n", "8", "--eval_every", "100", "--ckpt_every", "2", "--log_every", "1",
       "--max_steps", "4"]
ENV = dict(os.environ, OMP_NUM_THREADS="1")


def cli(script, argv, kill=None, timeout=120):
    env = dict(ENV, DUALTOKEN_TEST_KILL=kill) if kill else ENV
    return subprocess.run([sys.executable, script, *argv], cwd=ROOT, capture_output=True, text=True, env=env,
                          timeout=timeout)


def one_line_error(p, prog, message):
    assert p.returncode == 2, (p.returncode, p.stderr[-2000:])
    err = [l for l in p.stderr.splitlines() if not l.startswith("data: ")]  # data.py's skip reports
    assert len(err) == 1 and err[0].startswith(f"{prog}: error: ") and message in err[0], p.stderr[-2000:]


@pytest.fixture(scope="module")
def straight(teacher_dir, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("straight"))
    T.main(TOK + ["--siglip", teacher_dir, "--out_dir", out])
    return out


def assert_same_checkpoint(a, b):
    ta, tb = load_file(os.path.join(a, "model.safetensors")), load_file(os.path.join(b, "model.safetensors"))
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
    sa, sb = (torch.load(os.path.join(d, "train_state.pt"), weights_only=True) for d in (a, b))
    assert sa["step"] == sb["step"]
    for k in sa["disc"]:
        assert torch.equal(sa["disc"][k], sb["disc"][k]), k
    assert torch.equal(sa["rng"][0], sb["rng"][0])


# ----------------------------------------------------------------------------------------------
# checkpoints: kill -9 inside the writer, resume, compare bit for bit

# after the model files (the train state of the new step not yet written: the old writer's "mixed"
# case), after the manifest (complete but not renamed), after the rename (the pointer not yet swapped)
@pytest.mark.parametrize("point", ["model", "manifest", "renamed"])
def test_tokenizer_killed_while_writing_a_checkpoint_resumes_exactly(point, straight, teacher_dir, tmp_path):
    out = str(tmp_path / "run")
    p = cli("tokenizer.py", TOK + ["--siglip", teacher_dir, "--out_dir", out], kill=f"step-000004/{point}")
    assert p.returncode == -signal.SIGKILL, p.stderr[-2000:]
    assert "step 2: checkpoint" in p.stdout and "step 4: checkpoint" not in p.stdout
    # the previous checkpoint is whole and still what out_dir shows; step 4 exists only once renamed
    assert os.readlink(os.path.join(out, "checkpoint")) == "step-000002"
    assert torch.load(os.path.join(out, "train_state.pt"), weights_only=True)["step"] == 2
    assert os.path.isdir(os.path.join(out, "step-000004")) == (point == "renamed")
    T.main(TOK + ["--siglip", teacher_dir, "--out_dir", out, "--resume"])
    assert os.readlink(os.path.join(out, "checkpoint")) == "step-000004"
    assert sorted(f for f in os.listdir(out) if "step-" in f) == ["step-000004"]  # the rest cleaned up
    assert_same_checkpoint(straight, out)


def test_teacher_killed_while_writing_a_checkpoint_resumes_exactly(tmp_path):
    argv = ["--preset", "shapes-teacher", "--max_steps", "4", "--ckpt_every", "2", "--batch_size", "4",
            "--hard_negatives", "1", "--warmup", "2", "--eval_every", "100", "--eval_n", "8"]
    T.main(argv + ["--out_dir", str(tmp_path / "a")])
    p = cli("tokenizer.py", argv + ["--out_dir", str(tmp_path / "b")], kill="step-000004/model")
    assert p.returncode == -signal.SIGKILL, p.stderr[-2000:]
    T.main(argv + ["--out_dir", str(tmp_path / "b"), "--resume"])
    a, b = (load_file(tmp_path / d / "model.safetensors") for d in "ab")
    assert all(torch.equal(a[k], b[k]) for k in a)


UNIFIED_KW = dict(max_steps=4, ckpt_every=2, decay_steps=4, warmup=2, batch_size=3)
UNIFIED_RUN = """
import sys
sys.path[:0] = [{root!r}, {tests!r}]
import unified as U
from test_unified_model import TINY_MODEL_KW, train_config
U.train(train_config({out!r}, {tok!r}, **{kw!r}), dict(TINY_MODEL_KW))
"""


@pytest.fixture(scope="module")
def unified_tokenizer(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("tokenizer"))
    tiny_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def unified_straight(unified_tokenizer, tmp_path_factory):
    return U.train(train_config(tmp_path_factory.mktemp("a"), unified_tokenizer, **UNIFIED_KW), dict(TINY_MODEL_KW))


@pytest.mark.parametrize("point", ["model", "train_state", "renamed"])
def test_unified_killed_while_writing_a_checkpoint_resumes_exactly(point, unified_tokenizer, unified_straight, tmp_path):
    out = str(tmp_path / "b")
    script = UNIFIED_RUN.format(root=ROOT, tests=os.path.join(ROOT, "tests"), out=out, tok=unified_tokenizer,
                                kw=UNIFIED_KW)
    p = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120,
                       env=dict(ENV, DUALTOKEN_TEST_KILL=f"step-000004/{point}"))
    assert p.returncode == -signal.SIGKILL, p.stderr[-2000:]
    # step 4 is there whole (renamed) or not at all; its temporary directory is never taken
    assert sorted(f for f in os.listdir(out) if not f.startswith(".")) == \
        ["step-000002"] + (["step-000004"] if point == "renamed" else [])
    assert U.resume_dir(out) == os.path.join(out, "step-00000" + ("4" if point == "renamed" else "2"))
    # --resume OUT_DIR: the newest complete checkpoint
    resumed = U.train(replace(train_config(out, unified_tokenizer, **UNIFIED_KW), resume=out))
    a, b = unified_straight.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ----------------------------------------------------------------------------------------------
# checkpoints: mixed, half-written and interrupted-old-layout ones are refused in one line

def test_mixed_or_half_written_checkpoints_are_refused_in_one_line(straight, teacher_dir, tmp_path, capsys):
    def broken(name, damage):
        out = tmp_path / name
        shutil.copytree(straight, out, symlinks=True)
        damage(out / "step-000004")
        return str(out)

    def truncate(d):
        with open(d / "model.safetensors", "r+b") as f:
            f.truncate(os.path.getsize(d / "model.safetensors") // 2)

    def mix(d):  # the train state of another step beside these weights (what the old writer could leave)
        state = torch.load(d / "train_state.pt", weights_only=True)
        torch.save({**state, "step": 2}, d / "train_state.pt")

    def legacy(d):  # the older layout (plain files in out_dir) after a kill between its renames
        out = d.parent
        for f in ("config.json", "model.safetensors", "train_state.pt"):
            os.remove(out / f)
            shutil.copyfile(d / f, out / f)
        shutil.rmtree(d)
        os.remove(out / "checkpoint")
        os.mkdir(out / ".checkpoint.tmp")

    for name, damage, message in (("truncated", truncate, "half-written or damaged: model.safetensors has"),
                                  ("missing", lambda d: os.remove(d / "train_state.pt"), "train_state.pt is missing"),
                                  ("mixed", mix, "train_state.pt is not the file written at step 4"),
                                  ("legacy", legacy, "interrupted checkpoint write (.checkpoint.tmp)")):
        out = broken(name, damage)
        with pytest.raises(SystemExit) as e:
            T.main(TOK + ["--siglip", teacher_dir, "--out_dir", out, "--max_steps", "6", "--resume"])
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.count("\n") == 1 and message in err, err
        assert err.startswith("tokenizer.py: error: --resume: ")
    # stage 2 from its command line: the same check, one line, exit 2
    out = tmp_path / "unified"
    U.train(train_config(out, _tokenizer_dir(tmp_path), max_steps=2, ckpt_every=1), dict(TINY_MODEL_KW))
    truncate(out / "step-000002")
    p = cli("unified.py", ["--resume", str(out)])
    one_line_error(p, "unified.py", "step-000002 is half-written or damaged: model.safetensors has")


def _tokenizer_dir(tmp_path):
    path = str(tmp_path / "tiny-tokenizer")
    tiny_tokenizer().save_pretrained(path)
    return path


# ----------------------------------------------------------------------------------------------
# data: no readable sample -> one line and a non-zero exit in seconds; fewer shards than readers

def _png(size=(40, 30), color=(200, 30, 30)):
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "PNG")
    return buf.getvalue()


def _add(tar, name, payload):
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    tar.addfile(info, io.BytesIO(payload))


def _good_shard(path, n, start=0):
    with tarfile.open(path, "w") as tar:
        for i in range(start, start + n):
            _add(tar, f"{i:06d}.png", _png(color=(10 * i % 255, 80, 160)))
            _add(tar, f"{i:06d}.txt", f"a picture number {i}".encode())


def _bad_data(root, kind):
    root.mkdir(exist_ok=True)
    if kind == "glob":
        _good_shard(root / "a.tar", 2)
        return str(root / "*.tar")
    if kind == "directory":
        _good_shard(root / "a.tar", 2)
        return str(root)
    if kind == "non-tar file":
        (root / "notes.tar").write_bytes(b"not a tar file\n" * 1000)
        return str(root / "notes.tar")
    if kind == "llava json":
        (root / "llava.json").write_text(json.dumps([{"id": "1", "image": "a.jpg", "conversations": []}] * 50))
        return str(root / "llava.json")
    # all-bad shards: two tars whose members are all broken in some way
    for s in range(2):
        with tarfile.open(root / f"bad-{s}.tar", "w") as tar:
            for i in range(20):
                _add(tar, f"{s}{i:04d}.jpg", b"\xff\xd8 truncated")
                _add(tar, f"{s}{i:04d}.txt", b"a caption")
    return str(root / "bad-{0..1}.tar")


HANG_CASES = ["glob", "directory", "non-tar file", "llava json", "all-bad shards"]


@pytest.mark.parametrize("kind", HANG_CASES)
def test_tokenizer_data_without_a_readable_sample_exits_in_seconds(kind, teacher_dir, tmp_path):
    spec = _bad_data(tmp_path / "data", kind)
    t = time.time()
    p = cli("tokenizer.py", TOK + ["--siglip", teacher_dir, "--out_dir", str(tmp_path / "out"), "--data", spec,
                                   "--workers", "2"], timeout=60)
    assert time.time() - t < 60
    one_line_error(p, "tokenizer.py", spec if kind not in ("glob", "directory") else "--data")
    if kind in ("glob", "directory"):
        assert "brace pattern" in p.stderr


@pytest.mark.parametrize("kind", HANG_CASES)
def test_unified_data_without_a_readable_sample_exits_in_seconds(kind, tmp_path):
    spec = _bad_data(tmp_path / "data", kind)
    tok = _tokenizer_dir(tmp_path)
    t = time.time()
    p = cli("unified.py", ["--model", "shapes", "--tokenizer", tok, "--data", spec, "--workers", "2",
                           "--max_steps", "2", "--batch_size", "2", "--out_dir", str(tmp_path / "out")], timeout=60)
    assert time.time() - t < 60
    one_line_error(p, "unified.py", f"{spec}: no readable sample")


def test_a_worker_whose_share_has_no_readable_sample_fails_instead_of_waiting(tmp_path):
    # one good shard and one all-bad shard, two workers: worker 1's share is all bad. The DataLoader
    # would wait for its batches forever; instead its NoSamples reaches the main process, one line.
    _good_shard(tmp_path / "s-0.tar", 4)
    with tarfile.open(tmp_path / "s-1.tar", "w") as tar:
        _add(tar, "x.jpg", b"")
        _add(tar, "x.txt", b"c")
    ds = D.WebDataset(str(tmp_path / "s-{0..1}.tar"), 16, shuffle=0, repeat=True, rank=0, world_size=1)
    ds.check()  # a readable sample exists, so the check passes
    batches = iter(torch.utils.data.DataLoader(ds, batch_size=2, num_workers=2))
    with pytest.raises(D.NoSamples) as e:
        for _ in batches:
            pass
    batches._shutdown_workers()  # worker 0 would otherwise keep filling its queue until teardown
    assert "\n" not in str(e.value) and "rank 0 worker 1 in a whole pass over its share" in str(e.value)


def test_fewer_shards_than_readers_are_split_by_sample(tmp_path, capfd):
    _good_shard(tmp_path / "one.tar", 10)
    keys = []
    for rank in range(2):
        ds = D.WebDataset(str(tmp_path / "one.tar"), 16, shuffle=3, rank=rank, world_size=2)
        keys += [k for b in torch.utils.data.DataLoader(ds, batch_size=1, num_workers=2) for k in b["key"]]
    assert sorted(keys) == [f"{i:06d}" for i in range(10)]  # each sample once over 2 ranks × 2 workers
    err = capfd.readouterr().err
    assert err.count("1 shard(s) for 4 readers (2 rank(s) × 2 worker(s)): each reader reads every shard") == 1


def test_one_shard_and_four_workers_trains_in_both_stages(teacher_dir, tmp_path, capfd):
    _good_shard(tmp_path / "one.tar", 12)
    T.main(TOK + ["--siglip", teacher_dir, "--out_dir", str(tmp_path / "tok"), "--data", str(tmp_path / "one.tar"),
                  "--workers", "4", "--max_steps", "2"])
    tc = train_config(tmp_path / "uni", _tokenizer_dir(tmp_path), data=str(tmp_path / "one.tar"), workers=4,
                      max_steps=2, log_every=1)
    U.train(tc, dict(TINY_MODEL_KW))
    cap = capfd.readouterr()
    assert cap.err.count("1 shard(s) for 4 readers (1 rank(s) × 4 worker(s))") == 2
    assert re.search(r"^step 2 \|.*\| data samples=\d+", cap.out, re.M)        # stage 1 prints the counts
    assert re.search(r"^step 2: loss.*\| data samples=\d+", cap.out, re.M)      # and stage 2


# ----------------------------------------------------------------------------------------------
# data: every kind of bad member counted, training goes on

def _jpeg(size=(40, 30), exif_orientation=None):
    im = Image.new("RGB", size, (30, 30, 30))
    im.paste((250, 250, 250), (0, 0, size[0] // 4, size[1]))  # a bright band on the left
    buf = io.BytesIO()
    exif = Image.Exif()
    if exif_orientation:
        exif[0x0112] = exif_orientation
    im.save(buf, "JPEG", quality=95, exif=exif.tobytes())
    return buf.getvalue()


def _bomb_png():
    # a valid 1×1 PNG whose header claims 30000 × 30000 pixels (CRC fixed up), as in test_data.py
    b = bytearray(_png((1, 1)))
    b[16:24] = struct.pack(">II", 30000, 30000)
    b[29:33] = struct.pack(">I", zlib.crc32(bytes(b[12:29])))
    return bytes(b)


def _kinds_shards(root):
    """Good samples beside 13 kinds of bad or odd members and shards -> (pattern, expected counts of one pass)."""
    with tarfile.open(root / "k-0.tar", "w") as tar:
        for i in range(8):
            _add(tar, f"good{i}.png", _png(color=(20 * i, 90, 150)))
            _add(tar, f"good{i}.txt", f"good picture {i}".encode())
        for key, members in {
            "truncated": {"jpg": _jpeg()[:300], "txt": b"c"},            # bad_image
            "html": {"png": b"<html>404</html>", "txt": b"c"},           # bad_image
            "empty": {"jpg": b"", "txt": b"c"},                           # empty
            "bomb": {"png": _bomb_png(), "txt": b"c"},                    # too_large
            "nocap": {"png": _png(), "json": b'{"url": "x"}'},             # no_caption
            "blankcap": {"png": _png(), "txt": b"  \n"},                  # no_caption
            "badjson": {"png": _png(), "json": b"{not json"},              # no_caption
            "textonly": {"txt": b"a caption without an image"},           # no_image
            "otherext": {"bmp": b"BM...", "txt": b"c"},                    # no_image
            "latin1": {"png": _png(), "txt": "caf\xe9 au lait".encode("latin-1")},  # bad_caption_bytes, kept
            "rotated": {"jpg": _jpeg(exif_orientation=6), "txt": b"turned"},  # a sample, turned upright
        }.items():
            for ext, payload in members.items():
                _add(tar, f"{key}.{ext}", payload)
        _add(tar, "._good0.png", b"macOS resource fork")  # junk the reader ignores
    (root / "k-1.tar").write_bytes(b"not a tar\n" * 100)                # bad_shards
    _good_shard(root / "k-2.tar", 4, start=100)
    with tarfile.open(root / "k-2.tar") as tar:
        cut = tar.getmembers()[4].offset_data + 50  # inside the third sample's image
    data = (root / "k-2.tar").read_bytes()
    (root / "k-2.tar").write_bytes(data[:cut])                          # bad_shards after its first 2 samples
    expected = dict(bad_image=2, empty=1, too_large=1, no_caption=3, no_image=2, bad_caption_bytes=1, bad_shards=2)
    return str(root / "k-{0..2}.tar"), expected


def test_exif_orientation_is_applied_and_bad_caption_bytes_counted(tmp_path):
    im = D.open_image(_jpeg((40, 30), exif_orientation=6))  # 6: rotate 90° clockwise to view
    assert im.size == (30, 40)
    a = torch.from_numpy(np.asarray(im)).float().mean(-1)  # (40, 30)
    assert a[:10].mean() > 200 and a[20:].mean() < 60  # the left band is now at the top
    pattern, expected = _kinds_shards(tmp_path)
    ds = D.WebDataset(pattern, 16, shuffle=0)
    got = {s["key"]: s for s in ds}
    assert got["latin1"]["caption"] == "caf\ufffd au lait" and got["rotated"]["caption"] == "turned"
    # the good ones, the two odd ones, and the samples of the truncated shard before the damage
    assert set(got) == {f"good{i}" for i in range(8)} | {"latin1", "rotated", "000100", "000101"}
    assert {k: v for k, v in ds.stats.items() if v and k != "samples"} == expected
    assert ds.stats["samples"] == len(got)


def test_a_shard_set_with_every_kind_of_bad_member_trains_to_the_end(teacher_dir, tmp_path, capsys):
    pattern, expected = _kinds_shards(tmp_path)
    T.main(TOK + ["--siglip", teacher_dir, "--out_dir", str(tmp_path / "out"), "--data", pattern,
                  "--workers", "0", "--max_steps", "3"])
    out = capsys.readouterr().out
    last = re.findall(r"^step 3 \|.*\| data (.*)$", out, re.M)
    counts = {k: int(v) for k, v in (kv.split("=") for kv in last[0].split())}
    assert counts["samples"] >= 24  # 3 steps × 2 micro-batches × 4
    for k, n in expected.items():   # every kind seen and counted (≥ one pass over the set)
        assert counts.get(k, 0) >= n, (k, counts)
    assert T.resume_dir(str(tmp_path / "out")).endswith("step-000003")


# ----------------------------------------------------------------------------------------------
# DDP in-sync check: exact bits

def test_rank_digest_compares_exact_bits():
    a = torch.randn(1000)
    swapped = a.clone()
    swapped[[3, 7]] = a[[7, 3]]               # the same sum and sum of squares, other bytes
    ulp = a.clone()
    ulp[500] = torch.nextafter(a[500], torch.tensor(float("inf")))  # one element, one ulp
    bf16 = a.bfloat16()
    d = T.tensor_digest([a, swapped, ulp, a.clone(), bf16, a.reshape(10, 100)])
    assert d.dtype == torch.int64 and d.shape == (6,)
    assert d[0] == d[3]                         # equal bits, equal digests
    assert d[0] != d[1] and d[0] != d[2]        # a sum-based fingerprint misses the swap
    assert d[0] != d[5]                         # the same bytes in another shape
    assert T.tensor_digest([bf16])[0] == d[4] and T.tensor_digest([bf16.clone()])[0] == d[4]
    # the check counts what it compares; one process has nobody to disagree with
    env = T.Env(0, 1, torch.device("cpu"), False, None)
    assert T.check_ranks_in_sync(env, [a, swapped]) == 2


# ----------------------------------------------------------------------------------------------
# untrusted files: LLaVA json entries, shard names, a checkpoint's paths, configs

def test_llava_malformed_entries_and_escaping_paths_are_skipped_and_counted(tmp_path):
    root, outside = tmp_path / "img", tmp_path / "secret"
    (root / "sub").mkdir(parents=True)
    outside.mkdir()
    for p in (root / "x.png", root / "sub" / "y.png", outside / "z.png"):
        Image.new("RGB", (6, 6), (0, 255, 0)).save(p)
    good = [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "Green."}]
    oks = [
        {"id": "ok1", "image": "x.png", "conversations": good},
        {"id": "ok2", "image": "sub/../sub/y.png", "conversations": good},  # ".." that stays inside
        {"id": "ok3", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]}]
    bad = [
        "not an object", None, 7,                                                 # bad_conversation × 3
        {"id": "nokey", "image": "x.png"},                                        # bad_conversation
        {"id": "notlist", "image": "x.png", "conversations": "hi"},              # bad_conversation
        {"id": "empty", "image": "x.png", "conversations": []},                  # bad_conversation
        {"id": "novalue", "image": "x.png", "conversations": [{"from": "human"}]},           # bad_conversation
        {"id": "intvalue", "conversations": [{"from": "human", "value": 3}]},                # bad_conversation
        {"id": "role", "image": "x.png", "conversations": [{"from": "robot", "value": "<image>"}]},  # bad_conversation
        {"id": "listrole", "conversations": [{"from": ["human"], "value": "hi"}]},           # bad_conversation
        {"id": "imgtype", "image": 5, "conversations": good},                    # bad_conversation
        {"id": "imglist", "image": ["x.png", 3], "conversations": good},         # bad_conversation
        {"id": "missing", "image": "nope.png", "conversations": good},           # bad_image (no such file)
        {"id": "abs", "image": str(outside / "z.png"), "conversations": good},   # bad_path
        {"id": "dotdot", "image": "../secret/z.png", "conversations": good},     # bad_path
        {"id": "deep", "image": "sub/../../secret/z.png", "conversations": good},  # bad_path
    ]
    # each bad entry followed by a good one, which serves its index: one skip counted per bad entry
    entries = [e for i, b in enumerate(bad) for e in (b, oks[i % 3])]
    (tmp_path / "llava.json").write_text(json.dumps(entries))
    ds = D.LlavaDataset(tmp_path / "llava.json", root, size=4)
    got = [b["id"] for batch in torch.utils.data.DataLoader(ds, batch_size=4, collate_fn=list) for b in batch]
    # a whole epoch: every bad entry replaced by the next good one, nothing raised
    assert len(got) == len(entries) and set(got) == {"ok1", "ok2", "ok3"}
    assert ds.stats["samples"] == len(entries)
    assert {k: v for k, v in ds.stats.items() if v and k != "samples"} == \
        dict(bad_conversation=12, bad_image=1, bad_path=3)
    # jsonl: a line that is not JSON is one bad entry
    (tmp_path / "llava.jsonl").write_text(json.dumps(oks[0]) + "\n{broken\n")
    ds = D.LlavaDataset(tmp_path / "llava.jsonl", root, size=4)
    assert [ds[i]["id"] for i in range(2)] == ["ok1", "ok1"] and ds.stats["bad_conversation"] == 1
    # nothing readable at all: NoSamples in one line, not an endless loop or a bare RuntimeError
    (tmp_path / "bad.json").write_text(json.dumps(bad[:5]))
    with pytest.raises(D.NoSamples, match="no readable sample in 5 items"):
        D.LlavaDataset(tmp_path / "bad.json", root, size=4)[0]
    (tmp_path / "obj.json").write_text(json.dumps({"id": 1}))
    with pytest.raises(ValueError, match="expected a JSON list"):
        D.LlavaDataset(tmp_path / "obj.json", root, size=4)


def _one_line_value_error(fn, message):
    with pytest.raises(ValueError) as e:
        fn()
    assert message in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_shard_names_and_text_tokenizer_paths_are_confined_to_the_checkpoint(tmp_path):
    src = tmp_path / "qwen"
    U.Qwen2(U.Qwen2Config(**{**U.PRESETS["shapes"], "n_layer": 1, "dim": 32, "intermediate_size": 64,
                             "n_head": 2, "n_kv_head": 1})).save_pretrained(src)
    (tmp_path / "outside.safetensors").write_bytes((src / "model.safetensors").read_bytes())
    keys = list(load_file(src / "model.safetensors"))
    os.rename(src / "model.safetensors", src / "part-1.safetensors")
    for name in ("../outside.safetensors", str(tmp_path / "outside.safetensors"), ""):
        (src / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {k: name for k in keys}}))
        for load in (lambda: U.Qwen2.from_pretrained(src), lambda: U.load_safetensors(src)):
            _one_line_value_error(load, f"{name!r} is not a file name inside {src}")
    (src / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {k: "part-1.safetensors" for k in keys}}))
    assert U.Qwen2.from_pretrained(src).config.dim == 32  # a proper index loads
    # a truncated shard: one line from its header, before anything is allocated
    data = (src / "part-1.safetensors").read_bytes()
    (src / "part-1.safetensors").write_bytes(data[:len(data) // 2])
    _one_line_value_error(lambda: U.Qwen2.from_pretrained(src), "not a readable safetensors file")

    # a unified checkpoint's text_tokenizer names a directory inside it, never one elsewhere
    tok = tiny_tokenizer()
    model = U.UnifiedModel.from_tokenizer(tiny_config(), tok)
    ckpt = tmp_path / "unified"
    model.save_pretrained(ckpt, tok)
    cfg = json.loads((ckpt / "config.json").read_text())
    for bad in ("../qwen", "/etc", "text_tokenizer/../../qwen"):
        (ckpt / "config.json").write_text(json.dumps({**cfg, "text_tokenizer": bad}))
        _one_line_value_error(lambda: U.UnifiedModel.from_pretrained(ckpt), f"{bad!r} is not a file name inside")


def test_configs_are_checked_before_any_allocation(tmp_path):
    tok = tiny_tokenizer()
    tok.save_pretrained(str(tmp_path / "tok"))
    cfg = json.loads((tmp_path / "tok" / "config.json").read_text())

    def tokenizer_with(name, **siglip):
        d = tmp_path / name
        shutil.copytree(tmp_path / "tok", d)
        (d / "config.json").write_text(json.dumps({**cfg, "siglip": {**cfg["siglip"], **siglip}}))
        return str(d)

    # a config far too large for the file: refused from the headers in a moment, nothing allocated
    # (the old loader gave the model storage first: 2^22-wide layers are terabytes)
    t = time.time()
    _one_line_value_error(lambda: T.DualTokenizer.from_pretrained(tokenizer_with("huge", width=2**22, mlp=2**22)),
                          "huge: 2 missing keys ['post_quant.skip.bias', 'post_quant.skip.weight']")
    assert time.time() - t < 10
    _one_line_value_error(lambda: T.DualTokenizer.from_pretrained(tokenizer_with("str", width="64")),
                          "siglip: width = '64' is not of type int")
    _one_line_value_error(lambda: T.DualTokenizer.from_pretrained(tokenizer_with("nan", layer_norm_eps=float("nan"))),
                          "layer_norm_eps = nan is not of type float")
    _one_line_value_error(lambda: T.DualTokenizer.from_pretrained(tokenizer_with("unknown", colour=1)),
                          "unknown key(s) ['colour']")
    _one_line_value_error(lambda: T.DualTokenizer.from_pretrained(tokenizer_with("negative", heads=-2)),
                          "negative/config.json: siglip: heads = -2 is negative")
    # HF configs the same way: a Qwen2 config.json with a wrongly typed or missing value
    src = tmp_path / "qwen"
    U.Qwen2(U.Qwen2Config(**{**U.PRESETS["shapes"], "n_layer": 1})).save_pretrained(src)
    hf = json.loads((src / "config.json").read_text())
    for change, message in ((dict(hidden_size=2**22, intermediate_size=2**22), "shape mismatch"),
                            (dict(num_hidden_layers="4"), "n_layer = '4' is not of type int"),
                            (dict(hidden_size=None), "dim = None is not of type int")):
        (src / "config.json").write_text(json.dumps({**hf, **change}))
        _one_line_value_error(lambda: U.Qwen2.from_pretrained(src), message)
    del hf["vocab_size"]
    (src / "config.json").write_text(json.dumps(hf))
    _one_line_value_error(lambda: U.Qwen2.from_pretrained(src), "config.json: no 'vocab_size'")
    # stage 2 from flags: a model that cannot fit in memory is refused before it is built
    with pytest.raises(ValueError, match=r"the model's weights alone need \d+\.\d GiB"):
        U.train(train_config(tmp_path / "run", str(tmp_path / "tok")), dict(TINY_MODEL_KW, depth_dim=2**20, depth_heads=1))


# ----------------------------------------------------------------------------------------------
# every command line: a user's mistake is one line on stderr and a non-zero exit, never a traceback

# Runs one script's cases in one process (torch imported once), each as `python SCRIPT ARGV...`
# would: its __main__ block, with stderr captured; an exception that escapes is printed as the
# interpreter prints it, so a traceback shows up in the captured stderr.
CASES_RUNNER = """
import io, json, runpy, sys, traceback
script, cases, out = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
results = []
for argv in cases:
    sys.argv, real = [script, *argv], sys.stderr
    sys.stderr = io.StringIO()
    try:
        runpy.run_path(script, run_name="__main__")
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) or e.code is None else (print(e.code, file=sys.stderr) or 1)
    except BaseException:
        traceback.print_exc()
        code = 1
    results.append([code, sys.stderr.getvalue()])
    sys.stderr = real
json.dump(results, open(out, "w"))
"""


@pytest.fixture(scope="module")
def user_dirs(teacher_dir, tmp_path_factory):
    """Good and broken model directories of every kind the command lines read."""
    root = tmp_path_factory.mktemp("user")
    tok = tiny_tokenizer()
    tok.save_pretrained(str(root / "tok"))
    U.UnifiedModel.from_tokenizer(tiny_config(), tok).save_pretrained(root / "ckpt", tokenizer=tok)

    def broken(src, name, damage):
        shutil.copytree(src, root / name)
        damage(root / name)
        return str(root / name)

    def truncate(d):
        data = (d / "model.safetensors").read_bytes()
        (d / "model.safetensors").write_bytes(data[:len(data) // 3])

    def edit(change):
        def damage(d):
            cfg = json.loads((d / "config.json").read_text())
            change(cfg)
            (d / "config.json").write_text(json.dumps(cfg))
        return damage

    (root / "a-file").write_text("not a directory")
    (root / "garbage.pth").write_bytes(b"\x80\x04 not a pickle")
    return dict(
        root=str(root), siglip=teacher_dir, tok=str(root / "tok"), ckpt=str(root / "ckpt"),
        unwritable=str(root / "a-file" / "out"),  # under a file: not writable, even by root
        siglip_truncated=broken(teacher_dir, "siglip_truncated", truncate),
        siglip_str=broken(teacher_dir, "siglip_str", edit(lambda c: c["vision_config"].update(num_hidden_layers="3"))),
        tok_truncated=broken(root / "tok", "tok_truncated", truncate),
        tok_unknown=broken(root / "tok", "tok_unknown", edit(lambda c: c.update(colour=1))),
        ckpt_truncated=broken(root / "ckpt", "ckpt_truncated", truncate),
        ckpt_str=broken(root / "ckpt", "ckpt_str", edit(lambda c: c["llm"].update(dim="256"))),
        lpips_truncated=str(root / "garbage.pth"))


def user_error_cases(d, tmp):
    """script -> [(argv, what the one line must say)]: per user-error class, each CLI that has it."""
    tok_run = TOK + ["--siglip", d["siglip"], "--out_dir", f"{tmp}/tok-out"]
    uni = ["--model", "shapes", "--tokenizer", d["tok"], "--max_steps", "2", "--batch_size", "2", "--out_dir", f"{tmp}/uni"]
    smp = ["--prompt", "a red circle", "--ckpt", d["ckpt"], "--device", "cpu", "--out", f"{tmp}/samples"]
    return {
        "tokenizer.py": [
            # missing, truncated, mistyped or the wrong kind of model directory; a hub id
            (TOK + ["--siglip", d["siglip_truncated"], "--out_dir", f"{tmp}/t1"], "not a readable safetensors file"),
            (TOK + ["--siglip", d["siglip_str"], "--out_dir", f"{tmp}/t2"], "layers = '3' is not of type int"),
            (TOK + ["--siglip", d["tok"], "--out_dir", f"{tmp}/t3"], "not a SigLIP config.json"),
            (TOK + ["--siglip", "google/siglip-so400m-patch14-384", "--out_dir", f"{tmp}/t4"], "hub id"),
            (TOK + ["--siglip", d["siglip"], "--out_dir", d["tok_unknown"], "--eval"], "unknown key(s) ['colour']"),
            (tok_run + ["--lpips", d["lpips_truncated"]], f"--lpips {d['lpips_truncated']}: "),
            # an output directory that cannot be written, checked before training
            (TOK + ["--siglip", d["siglip"], "--out_dir", d["unwritable"]], "not a writable directory"),
            # nonsense values, abbreviated flags
            (tok_run + ["--max_steps", "-1"], "--max_steps must be at least 1"),
            (tok_run + ["--batch_size", "0"], "--batch_size must be at least 1"),
            (tok_run + ["--grad_accum", "0"], "--grad_accum must be at least 1"),
            (tok_run + ["--ckpt_every", "0"], "--ckpt_every must be at least 1"),
            (tok_run + ["--lr", "nan"], "--lr nan: must be a finite number"),
            (tok_run + ["--device", "tpu"], "--device 'tpu'"),
            (tok_run + ["--max_step", "4"], "unrecognized arguments: --max_step"),
        ],
        "unified.py": [
            (uni[:3] + [d["tok_truncated"]] + uni[4:], "not a readable safetensors file"),
            (uni[:3] + [d["tok_unknown"]] + uni[4:], "unknown key(s) ['colour']"),
            (uni[:3] + [d["siglip"]] + uni[4:], "is not a dualtoken-tokenizer/1 checkpoint"),
            (uni[:3] + ["someone/dualtoken-tokenizer"] + uni[4:], "hub id"),
            (uni + ["--llm", "Qwen/Qwen2.5-3B"], "hub id"),
            (uni + ["--llm", d["tok"]], f"--llm {d['tok']}: "),
            (uni[:-1] + [d["unwritable"]], "not a writable directory"),
            (uni + ["--max_steps", "0"], "--max_steps must be at least 1"),
            (uni + ["--batch_size", "-2"], "--batch_size must be at least 1"),
            (uni + ["--grad_accum", "0"], "--grad_accum must be at least 1"),
            (uni + ["--ckpt_every", "0"], "--ckpt_every must be at least 1"),
            (uni + ["--lr", "inf"], "--lr inf: must be a finite number"),
            (uni + ["--device", "tpu"], "--device 'tpu'"),
            (uni + ["--visual_input", "both"], "visual_input='both'"),
            (uni + ["--max_step", "2"], "unrecognized arguments: --max_step"),
            (["--resume", d["ckpt"]], "no checkpoint (step-N/ directory)"),
            (["extract-codes", "--tokenizer", d["tok"], "--codes", d["unwritable"]], "not a writable directory"),
            (["export", d["ckpt_truncated"], f"{tmp}/exported"], "not a readable safetensors file"),
            (["export", d["tok"], f"{tmp}/exported"], "no tokenizer/config.json"),
            (["export", d["ckpt"], d["unwritable"]], "not a writable directory"),
            (["export", d["ckpt"], f"{tmp}/exported", "--sample_cfg", "nan"], "sample_cfg"),
            (["export", d["ckpt"], f"{tmp}/exported", "--dt", "float32"], "unrecognized arguments: --dt"),
            (["norms", d["ckpt_str"]], "dim = '256' is not of type int"),
            (["norms", "someone/unified"], "hub id"),
        ],
        "sample.py": [
            (smp[:3] + [d["ckpt_truncated"]] + smp[4:], "not a readable safetensors file"),
            (smp[:3] + [d["ckpt_str"]] + smp[4:], "dim = '256' is not of type int"),
            (smp[:3] + [d["tok"]] + smp[4:], "not a dualtoken-unified/1 checkpoint"),
            (smp[:3] + ["someone/dualtoken-3b"] + smp[4:], "hub id"),
            (smp[:-1] + [d["unwritable"]], "not a writable directory"),
            (smp + ["--cfg", "nan"], "--cfg nan: must be a finite number"),
            (smp + ["--temperature", "inf"], "--temperature inf: must be a finite number"),
            (smp + ["--num_samples", "0"], "--num_samples must be at least 1"),
            (smp[:4] + ["--device", "tpu"], "--device 'tpu'"),
            (smp + ["--promp", "x"], "unrecognized arguments: --promp"),
        ],
        "losses.py": [
            (["convert-lpips", "--vgg", f"{tmp}/none.pth", "--lin", f"{tmp}/none.pth"], "No such file"),
            (["convert-lpips", "--vgg", d["lpips_truncated"], "--lin", d["lpips_truncated"]], "not a weights file torch.load(weights_only=True) reads"),
            (["convert-lpips", "--vg", "a", "--lin", "b"], "error: "),
        ],
    }


@pytest.mark.parametrize("script", ["tokenizer.py", "unified.py", "sample.py", "losses.py"])
def test_user_mistakes_are_one_line_and_a_nonzero_exit(script, user_dirs, tmp_path):
    cases = user_error_cases(user_dirs, str(tmp_path))[script]
    out = tmp_path / "results.json"
    p = subprocess.run([sys.executable, "-c", CASES_RUNNER, script, json.dumps([a for a, _ in cases]), str(out)],
                       cwd=ROOT, capture_output=True, text=True, env=ENV, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    bad = []
    for (argv, message), (code, err) in zip(cases, json.loads(out.read_text())):
        lines = [l for l in err.splitlines() if l.strip()]
        if not (code not in (0, None) and len(lines) == 1 and "Traceback" not in err and message in lines[0]
                and lines[0].startswith(f"{script}: error: ")):
            bad.append(f"{script} {' '.join(argv[-4:])} -> exit {code}: {err[-600:]}")
    assert not bad, "\n".join(bad)
