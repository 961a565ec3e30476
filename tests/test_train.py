import json
import math
import pytest
import torch
from PIL import Image

import data
import train
from checkpoints import load_checkpoint_dict
from model import load_model
from tests.conftest import run_script
from utils import run_cli
from checkpoints import weights_fingerprint

# a tiny network on tiny synthetic images: each epoch takes a fraction of a second on CPU
# --device cpu: the exact-resume and gloo tests are CPU guarantees, and must hold on a CUDA box too
TINY = ["--image-size", "32", "--channels", "8,8,16,16,16", "--latent-dim", "16", "--batch-size", "16",
        "--dataset", "synthetic", "--synthetic-images", "300", "--no-progress", "--device", "cpu"]


def read_metrics(out_dir):
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


def test_smoke_preset_cli_writes_every_output(tmp_path):
    out = tmp_path / "smoke"
    proc = run_script("train.py", "--preset", "smoke", "--dataset", "synthetic", "--synthetic-images", "600",
                      "--epochs", "3", "--out-dir", out, "--no-progress")
    assert "test MSE" in proc.stdout
    rows = read_metrics(out)
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    assert rows[-1]["train_loss"] < rows[0]["train_loss"]  # it learns
    for key in ("train_loss", "val_loss", "lr", "epoch_time_s", "images_per_s", "peak_memory_gb"):
        assert all(math.isfinite(r[key]) for r in rows), key
    for name in ("model_best_checkpoint.ckpt", "last_checkpoint.ckpt", "loss_curve.png", "results.json",
                 "release/model.safetensors", "release/config.json"):
        assert (out / name).exists(), name
    results = json.loads((out / "results.json").read_text())
    best = load_model(out / "model_best_checkpoint.ckpt")  # the card's loader
    release = load_model(out / "release")
    size = best.config.image_size
    x = torch.rand(2, 3, size, size) * 2 - 1
    with torch.no_grad():
        assert torch.equal(best.reconstruction_error(x), release.reconstruction_error(x))
    assert results["best_weights"] == weights_fingerprint(best)
    assert math.isfinite(results["test_mse"]) and 0 < results["test_mse"] < 1
    with Image.open(out / "loss_curve.png") as img:
        assert img.size[0] > 100


def last_weights(out_dir):
    return load_checkpoint_dict(out_dir / "last_checkpoint.ckpt")["model"]


def test_resume_after_interruption_matches_uninterrupted_run(tmp_path):
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    train.main(TINY + ["--epochs", "3", "--out-dir", str(straight)])
    train.main(TINY + ["--epochs", "1", "--out-dir", str(interrupted)])
    assert len(read_metrics(interrupted)) == 1
    train.main(["--resume", "--epochs", "3", "--out-dir", str(interrupted), "--no-progress",
                "--device", "cpu"])  # the rest comes from the checkpoint

    a, b = last_weights(straight), last_weights(interrupted)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    strip = lambda rows: [(r["epoch"], r["train_loss"], r["val_loss"], r["lr"]) for r in rows]  # noqa: E731
    assert strip(read_metrics(straight)) == strip(read_metrics(interrupted))


def test_killed_run_resumes_to_the_same_weights(tmp_path):
    import signal
    import subprocess
    import sys
    import time

    from tests.conftest import ROOT

    killed, straight = tmp_path / "killed", tmp_path / "straight"
    proc = subprocess.Popen([sys.executable, "train.py", *TINY, "--epochs", "50", "--out-dir", str(killed)],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not (killed / "metrics.jsonl").exists():
            time.sleep(0.05)
        time.sleep(0.3)  # somewhere in the middle of an epoch, or of writing a checkpoint
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    done = load_checkpoint_dict(killed / "last_checkpoint.ckpt")["epoch"]  # loads: never truncated
    assert 1 <= done < 50
    train.main(["--resume", "--epochs", str(done + 1), "--out-dir", str(killed), "--no-progress",
                "--device", "cpu"])
    train.main(TINY + ["--epochs", str(done + 1), "--out-dir", str(straight)])
    a, b = last_weights(straight), last_weights(killed)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_without_checkpoint_is_an_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        train.main(["--resume", "--out-dir", str(tmp_path / "empty")])
    assert exit_info.value.code == 2
    assert "nothing to resume" in capsys.readouterr().err


def test_corrupt_resume_checkpoint_is_a_one_line_error(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "last_checkpoint.ckpt").write_bytes(b"\x80\x02truncated")
    proc = run_script("train.py", "--resume", "--out-dir", out, check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "not a readable PyTorch checkpoint" in proc.stderr


@pytest.mark.parametrize("edit, fragment", [
    (lambda c: c["train_config"].update(batch_size=0), "batch_size"),  # would divide by zero an epoch later
    (lambda c: c["train_config"].update(extra=1), "saved settings"),
    (lambda c: c.update(epoch="3"), "cannot resume"),
    (lambda c: c["rng"].update(torch=torch.zeros(3)), "cannot resume"),
    (lambda c: c["optimizer"]["param_groups"].append(c["optimizer"]["param_groups"][0]), "cannot resume"),
])
def test_a_resume_checkpoint_that_does_not_fit_is_one_line(tmp_path, capsys, edit, fragment):
    out = tmp_path / "run"
    train.main(TINY + ["--epochs", "1", "--out-dir", str(out), "--device", "cpu"])
    ckpt = torch.load(out / "last_checkpoint.ckpt", weights_only=True)
    edit(ckpt)  # as an edited file, or one another version of the code wrote
    torch.save(ckpt, out / "last_checkpoint.ckpt")
    with pytest.raises(SystemExit) as stop:
        run_cli(train.main, ["--resume", "--epochs", "2", "--out-dir", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 2 and len(err) == 1 and err[0].startswith("error: ") and fragment in err[0], err


def test_out_dir_that_is_a_file_is_one_line(tmp_path):
    (tmp_path / "f").write_text("x")
    proc = run_script("train.py", *TINY, "--out-dir", tmp_path / "f", check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"error: --out-dir {tmp_path / 'f'} is a file, not a folder"


def test_fresh_run_refuses_to_overwrite_a_previous_one(tmp_path, capsys):
    out = tmp_path / "run"
    train.main(TINY + ["--epochs", "1", "--out-dir", str(out)])
    before = (out / "last_checkpoint.ckpt").read_bytes()
    with pytest.raises(SystemExit):
        train.main(TINY + ["--epochs", "1", "--out-dir", str(out)])
    assert "--resume" in capsys.readouterr().err
    assert (out / "last_checkpoint.ckpt").read_bytes() == before


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, capsys):
    out = tmp_path / "run"
    train.main(TINY + ["--epochs", "1", "--out-dir", str(out)])
    names = ("last_checkpoint.ckpt", "model_best_checkpoint.ckpt", "metrics.jsonl")
    files = {n: (out / n).read_bytes() for n in names}
    # an absurd learning rate from those weights blows the network up in the first epoch
    with pytest.raises(SystemExit) as exit_info:
        train.main(TINY + ["--epochs", "2", "--out-dir", str(out), "--overwrite", "--lr", "1e30",
                           "--init-from", str(out / "model_best_checkpoint.ckpt")])
    assert exit_info.value.code == 1
    assert "non-finite loss" in capsys.readouterr().out
    assert {n: (out / n).read_bytes() for n in files} == files
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


def test_init_from_fine_tunes_existing_weights(tmp_path):
    base, tuned = tmp_path / "base", tmp_path / "tuned"
    train.main(TINY + ["--epochs", "2", "--out-dir", str(base)])
    # the architecture comes from the checkpoint, not from the (different) flags
    train.main(TINY + ["--epochs", "1", "--channels", "4,4,4,4,4", "--out-dir", str(tuned),
                       "--init-from", str(base / "model_best_checkpoint.ckpt")])
    best = "model_best_checkpoint.ckpt"
    assert load_model(tuned / best).config == load_model(base / best).config
    # starting from trained weights, the first epoch already trains at a lower loss than from scratch
    assert read_metrics(tuned)[0]["train_loss"] < read_metrics(base)[0]["train_loss"]


@pytest.mark.parametrize("n, world, batch", [(31, 2, 16), (4095, 2, 1024), (1000, 3, 7), (50, 4, 16)])
def test_every_rank_gets_the_same_number_of_whole_batches(n, world, batch):
    shards = [data.epoch_shard(n, batch, 0, 1, rank, world, torch.device("cpu")) for rank in range(world)]
    assert len({len(s) for s in shards}) == 1 and len(shards[0]) % batch == 0
    assert len(shards[0]) == n // world // batch * batch
    everything = torch.cat(shards)
    assert len(set(everything.tolist())) == len(everything)  # no image twice in an epoch


def test_resume_applies_typed_hyperparameters(tmp_path):
    out = tmp_path / "run"
    train.main(TINY + ["--epochs", "1", "--out-dir", str(out)])
    train.main(["--resume", "--epochs", "2", "--lr", "5e-4", "--lr-patience", "9", "--out-dir", str(out),
                "--no-progress", "--device", "cpu"])
    ckpt = load_checkpoint_dict(out / "last_checkpoint.ckpt")
    assert read_metrics(out)[1]["lr"] == 5e-4
    assert ckpt["optimizer"]["param_groups"][0]["lr"] == 5e-4 and ckpt["scheduler"]["patience"] == 9


def test_resume_refuses_flags_that_would_change_the_run(tmp_path, capsys):
    out = tmp_path / "run"
    train.main(TINY + ["--epochs", "1", "--out-dir", str(out)])
    before = (out / "last_checkpoint.ckpt").read_bytes()
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        train.main(["--resume", "--epochs", "2", "--batch-size", "8", "--out-dir", str(out)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "--batch-size" in err[0]
    assert "--epochs" in err[0].split("only")[1]  # names what may change too
    assert (out / "last_checkpoint.ckpt").read_bytes() == before
    assert len(read_metrics(out)) == 1


def test_help_prints_the_defaults():
    help_text = " ".join(run_script("train.py", "--help").stdout.split())  # undo argparse's line wrapping
    assert "python train.py" in help_text  # the usage examples of the docstring, as written
    assert "--batch-size BATCH_SIZE per process (default: 1024)" in help_text
    assert "(default: 64,128,256,384,512)" in help_text
    smoke = " ".join(run_script("train.py", "--preset", "smoke", "--help").stdout.split())
    assert "--batch-size BATCH_SIZE per process (default: 32)" in smoke  # --preset sets the defaults shown


def test_resume_after_fine_tuning_keeps_the_checkpoint_architecture(tmp_path):
    base, tuned = tmp_path / "base", tmp_path / "tuned"
    train.main(TINY + ["--epochs", "1", "--out-dir", str(base)])
    train.main(TINY + ["--epochs", "1", "--channels", "4,4,4,4,4", "--out-dir", str(tuned),
                       "--init-from", str(base / "model_best_checkpoint.ckpt")])
    train.main(["--resume", "--epochs", "2", "--out-dir", str(tuned), "--no-progress", "--device", "cpu"])
    assert len(read_metrics(tuned)) == 2
    assert load_model(tuned / "last_checkpoint.ckpt").config.channels == (8, 8, 16, 16, 16)


def test_abbreviated_flags_are_refused(tmp_path, capsys):
    # --resume must know which flags were typed; an abbreviation would slip past it
    with pytest.raises(SystemExit) as exit_info:
        train.main(TINY + ["--epoch", "3", "--out-dir", str(tmp_path / "run")])
    assert exit_info.value.code == 2


def test_folder_dataset_skips_unreadable_files(tmp_path, capsys):
    folder = tmp_path / "photos" / "nested"
    folder.mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    for i in range(60):
        pixels = (torch.rand(40, 48, 3, generator=g) * 255).byte().numpy()
        Image.fromarray(pixels).save(folder / f"img{i}.{'png' if i % 2 else 'jpg'}")
    (folder / "broken.jpg").write_bytes(b"not a jpeg at all")
    (folder / "empty.png").write_bytes(b"")
    out = tmp_path / "run"
    train.main(["--dataset", "folder", "--data-dir", str(tmp_path / "photos"), "--image-size", "32",
                "--channels", "8,8,16,16,16", "--latent-dim", "16", "--batch-size", "8", "--epochs", "1",
                "--out-dir", str(out), "--no-progress"])
    captured = capsys.readouterr()
    assert "60 images from" in captured.out and "2 unreadable skipped" in captured.out
    assert "broken.jpg" in captured.err
    assert (out / "model_best_checkpoint.ckpt").exists()


def test_cifar10_from_a_local_folder(cifar_dir, tmp_path, capsys):
    out = tmp_path / "run"
    train.main(["--data-dir", str(cifar_dir), "--image-size", "32", "--channels", "8,8,16,16,16",
                "--latent-dim", "16", "--batch-size", "16", "--epochs", "1", "--out-dir", str(out),
                "--no-progress"])
    captured = capsys.readouterr().out
    assert "train 90 / val 10 / test 40 images at (32, 32)" in captured
    assert math.isfinite(json.loads((out / "results.json").read_text())["test_mse"])


def test_cifar10_missing_offline_says_where_to_put_it(tmp_path):
    proc = run_script("train.py", "--data-dir", tmp_path / "nowhere", "--out-dir", tmp_path / "run",
                      check=False, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "cifar-10-python.tar.gz" in lines[0], proc.stderr


def test_two_process_ddp_on_cpu_ends_with_identical_weights(tmp_path):
    out = tmp_path / "ddp"
    proc = run_script("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py", *TINY,
                      "--epochs", "2", "--out-dir", out, env={"OMP_NUM_THREADS": "1"})
    results = json.loads((out / "results.json").read_text())
    assert results["world_size"] == 2
    ranks = results["final_weights_per_rank"]
    assert len(ranks) == 2 and ranks[0] == ranks[1]
    rows = read_metrics(out)
    # no "the loss falls": two epochs of a tiny net need not lower it, and the test is about agreement
    assert len(rows) == 2 and all(math.isfinite(r["train_loss"]) for r in rows)
    assert proc.stdout.count("epoch   1 |") == 1  # only rank 0 logs


def test_more_processes_than_gpus_is_one_line(monkeypatch):
    from utils import UserError, setup_distributed

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    with pytest.raises(UserError, match="local rank 1 but 1 GPU"):
        setup_distributed("cuda")  # before any process group or CUDA call


def launch_two_ranks(*args, cwds=(None, None), timeout=120):
    """train.py on two gloo processes, as torchrun starts them (rank r in cwds[r]): [(status, stderr)]."""
    import os
    import socket
    import subprocess
    import sys

    from tests.conftest import ROOT

    with socket.socket() as s:  # a free port for the process group's store
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
           "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, str(ROOT / "train.py"), *map(str, args)], cwd=cwd or ROOT,
                              env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)}, text=True,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
             for rank, cwd in enumerate(cwds)]
    try:
        return [(p.wait(timeout), p.stderr.read()) for p in procs]
    finally:
        for p in procs:
            p.kill()
            p.wait()


def test_a_rank_that_fails_stops_every_rank_with_its_message(tmp_path):
    # --init-from weights that only rank 0 can read, as on a node without them: a real per-rank failure
    from model import ResidualAutoencoder
    from tests.conftest import TINY as TINY_CONFIG, save_checkpoint

    here, there = tmp_path / "rank0", tmp_path / "rank1"
    save_checkpoint(ResidualAutoencoder(TINY_CONFIG), here / "init.ckpt")
    there.mkdir()
    (status0, err0), (status1, err1) = launch_two_ranks(
        *TINY, "--dataset", "synthetic", "--synthetic-images", "300", "--init-from", "init.ckpt", "--epochs", "1",
        "--out-dir", tmp_path / "run", cwds=(here, there), timeout=60)  # seconds, not a process group timeout
    assert status1 == 2 and err1.strip() == "error: rank 1: checkpoint not found: init.ckpt", err1
    assert status0 == 1 and err0.strip() == "error: rank 0: stopping, as rank 1 failed", err0


def test_ranks_decode_a_folder_once_between_them_and_refuse_different_listings(tmp_path, monkeypatch):
    from utils import UserError

    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(7):
        Image.fromarray((torch.rand(40, 40, 3) * 255).byte().numpy()).save(folder / f"{i}.png")
    (folder / "6.png").write_bytes(b"not a png")
    files = sorted(str(f) for f in folder.iterdir())
    single, skipped = data.load_image_folder(folder, 32)
    assert skipped == 1 and len(single) == 6
    reads, real_read, parts = [], data.read_image, {}
    monkeypatch.setattr(data, "read_image", lambda path, **kw: reads.append(path) or real_read(path, **kw))
    monkeypatch.setattr(data.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(data.dist, "get_world_size", lambda: 2)

    def as_rank(rank, listings=lambda files: [files, files]):
        """load_image_folder as rank `rank` of two; the all-gather hands back every part given so far."""
        def gather(obj):
            if isinstance(obj, list):  # the file listings
                return listings(obj)
            parts[rank] = obj
            return [parts[r] for r in sorted(parts)]
        monkeypatch.setattr(data.dist, "get_rank", lambda: rank)
        monkeypatch.setattr(data, "gather", gather)
        reads.clear()
        return data.load_image_folder(folder, 32)

    as_rank(0)
    assert reads == files[0::2]  # its share only
    merged, merged_skipped = as_rank(1)  # both parts now: what every rank gets
    assert reads == files[1::2]
    assert torch.equal(merged, single) and merged_skipped == 1  # in listing order, as one process reads it
    with pytest.raises(UserError, match="the ranks list different files"):
        as_rank(0, listings=lambda files: [files, files[:-1]])


def test_resume_on_another_number_of_processes_keeps_the_global_batch(tmp_path, capsys):
    out = tmp_path / "run"
    statuses = launch_two_ranks(*TINY, "--epochs", "1", "--out-dir", out)
    assert [s for s, _ in statuses] == [0, 0], statuses
    assert load_checkpoint_dict(out / "last_checkpoint.ckpt")["world_size"] == 2
    for epochs in ("2", "3"):  # one process now, with the run's own command line, twice
        train.main(TINY + ["--epochs", epochs, "--out-dir", str(out), "--resume"])
        assert "batch 32 per process (32 in all)" in capsys.readouterr().out
    ckpt = load_checkpoint_dict(out / "last_checkpoint.ckpt")  # the run's own batch and process count
    assert ckpt["world_size"] == 2 and ckpt["train_config"]["batch_size"] == 16 and ckpt["epoch"] == 3
    assert json.loads((out / "results.json").read_text())["global_batch"] == 32
    # a global batch two processes cannot share is refused by both, and the run stays as it was
    ckpt["train_config"]["batch_size"], ckpt["world_size"] = 31, 1
    torch.save(ckpt, out / "last_checkpoint.ckpt")
    before = (out / "last_checkpoint.ckpt").read_bytes()
    for rank, (status, err) in enumerate(launch_two_ranks("--resume", "--epochs", "4", "--out-dir", out)):
        assert status == 2 and err.count("\n") == 1, err
        assert err.startswith(f"error: rank {rank}: ") and "global batch of 31" in err and "over 2" in err
    assert (out / "last_checkpoint.ckpt").read_bytes() == before


def test_resume_accepts_the_command_line_of_the_run(tmp_path, capsys):
    out, data = tmp_path / "run", tmp_path / "data"
    line = ["--preset", "smoke", "--dataset", "synthetic", "--synthetic-images", "300", "--data-dir",
            str(data), "--seed", "0", "--no-progress", "--device", "cpu", "--out-dir", str(out)]
    train.main(line + ["--epochs", "1"])
    train.main(line + ["--epochs", "2", "--resume"])  # the same flags, and values, as the saved run
    assert [r["epoch"] for r in read_metrics(out)] == [1, 2]
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        train.main(line + ["--epochs", "3", "--resume", "--seed", "1"])  # a real change
    err = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 2 and len(err) == 1 and "--seed" in err[0] and "the run has --seed 0" in err[0]
    # after --init-from the weights set the architecture, whatever the architecture flags said
    tuned, line = tmp_path / "tuned", TINY + ["--channels", "4,4,4,4,4", "--init-from",
                                              str(out / "model_best_checkpoint.ckpt")]
    train.main(line + ["--epochs", "1", "--out-dir", str(tuned)])
    train.main(line + ["--epochs", "2", "--out-dir", str(tuned), "--resume"])
    assert len(read_metrics(tuned)) == 2


def test_resume_may_turn_compile_on(tmp_path, monkeypatch):
    out = tmp_path / "run"
    train.main(TINY + ["--epochs", "1", "--out-dir", str(out)])
    compiled = []
    monkeypatch.setattr(torch, "compile", lambda net: compiled.append(net) or net)  # only speed changes
    train.main(["--resume", "--compile", "--epochs", "2", "--out-dir", str(out)])
    assert compiled and load_checkpoint_dict(out / "last_checkpoint.ckpt")["train_config"]["compile"] is True


def test_checkpoint_every_k_epochs_and_on_ctrl_c_resumes_exactly(tmp_path, monkeypatch):
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    train.main(TINY + ["--epochs", "5", "--out-dir", str(straight)])
    real_epoch = train.train_one_epoch

    def ctrl_c_in_epoch_3(*args):
        epoch = args[6]
        saved = load_checkpoint_dict(stopped / "last_checkpoint.ckpt")["epoch"] if epoch > 1 else None
        assert saved == (1 if epoch > 1 else None)  # the first epoch, then every 3: none between
        if epoch == 3:
            raise KeyboardInterrupt
        return real_epoch(*args)

    monkeypatch.setattr(train, "train_one_epoch", ctrl_c_in_epoch_3)
    with pytest.raises(SystemExit) as stop:
        run_cli(train.main, TINY + ["--epochs", "5", "--checkpoint-every", "3", "--out-dir", str(stopped)])
    assert stop.value.code == 130
    assert load_checkpoint_dict(stopped / "last_checkpoint.ckpt")["epoch"] == 2  # finished epochs are kept
    monkeypatch.setattr(train, "train_one_epoch", real_epoch)
    train.main(["--resume", "--epochs", "5", "--out-dir", str(stopped)])
    a, b = last_weights(straight), last_weights(stopped)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert load_checkpoint_dict(stopped / "last_checkpoint.ckpt")["epoch"] == 5  # the last epoch: always


def test_ctrl_c_during_a_due_write_keeps_the_held_epochs(tmp_path, monkeypatch):
    out, real_save = tmp_path / "run", train.save_checkpoints

    def ctrl_c_in_epoch_3s_write(out_dir, state, best, last=True):
        if state["epoch"] == 3 and last:
            raise KeyboardInterrupt
        return real_save(out_dir, state, best, last)

    monkeypatch.setattr(train, "save_checkpoints", ctrl_c_in_epoch_3s_write)
    with pytest.raises(SystemExit):
        run_cli(train.main, TINY + ["--epochs", "5", "--checkpoint-every", "3", "--out-dir", str(out)])
    assert load_checkpoint_dict(out / "last_checkpoint.ckpt")["epoch"] == 2  # not lost with epoch 3's write


def test_overwrite_never_leaves_the_previous_runs_resume_state_beside_its_files(tmp_path, monkeypatch):
    out, real_epoch = tmp_path / "run", train.train_one_epoch
    train.main(TINY + ["--epochs", "1", "--out-dir", str(out)])

    def ctrl_c_in_epoch_2(*args):
        if args[6] == 2:
            raise KeyboardInterrupt
        return real_epoch(*args)

    monkeypatch.setattr(train, "train_one_epoch", ctrl_c_in_epoch_2)
    with pytest.raises(SystemExit):  # the new run stops before its first due epoch (3)
        run_cli(train.main, TINY + ["--epochs", "4", "--checkpoint-every", "3", "--overwrite", "--seed", "7",
                                    "--out-dir", str(out)])
    ckpt = load_checkpoint_dict(out / "last_checkpoint.ckpt")  # the new run's first epoch, not the old run
    assert ckpt["train_config"]["seed"] == 7 and ckpt["epoch"] == 1


def test_epoch_figures_count_validation_and_checkpoint_writes(tmp_path):
    out = tmp_path / "run"
    train.main(TINY + ["--epochs", "2", "--out-dir", str(out)])
    rows = read_metrics(out)
    assert all(r["epoch_wall_s"] > r["epoch_time_s"] > 0 for r in rows)
    results = json.loads((out / "results.json").read_text())
    assert results["train_time_min"] == round(sum(r["epoch_wall_s"] for r in rows) / 60, 3)


def test_sync_bn_makes_batchnorm_synchronised_under_ddp(monkeypatch):
    import utils

    cfg = train.TrainConfig(image_size=32, channels=(8, 8, 16, 16, 16), latent_dim=16, sync_bn=True)
    with pytest.raises(utils.UserError, match="--sync-bn: .*CUDA only"):
        utils.parallel(train.new_model(cfg), torch.device("cpu"), world=2, sync_bn=True)
    monkeypatch.setattr(utils, "DDP", lambda module, device_ids: module)  # DDP needs GPUs and a group
    model = train.new_model(cfg)
    keys = model.state_dict().keys()
    net = utils.parallel(model, torch.device("cuda", 0), world=2, sync_bn=True)
    kinds = {type(m) for m in net.modules()}
    assert torch.nn.SyncBatchNorm in kinds and torch.nn.BatchNorm2d not in kinds
    assert model.state_dict().keys() == keys  # checkpoints load as before
    plain = utils.parallel(train.new_model(cfg), torch.device("cuda", 0), world=2, sync_bn=False)
    assert torch.nn.SyncBatchNorm not in {type(m) for m in plain.modules()}


def test_resume_builds_the_optimizer_this_device_wants(tmp_path):
    out = tmp_path / "run"
    train.main(TINY + ["--epochs", "1", "--out-dir", str(out)])
    ckpt = torch.load(out / "last_checkpoint.ckpt", weights_only=True)
    for group in ckpt["optimizer"]["param_groups"]:
        group["fused"] = True  # as a run on a GPU saves it
    torch.save(ckpt, out / "last_checkpoint.ckpt")
    train.main(["--resume", "--epochs", "2", "--out-dir", str(out)])  # on the CPU
    groups = load_checkpoint_dict(out / "last_checkpoint.ckpt")["optimizer"]["param_groups"]
    assert groups[0]["fused"] is False


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
def test_a_cpu_run_resumed_on_a_gpu_gets_the_fused_optimizer(tmp_path):
    out = tmp_path / "run"
    train.main(TINY + ["--epochs", "1", "--out-dir", str(out)])
    train.main(["--resume", "--epochs", "2", "--out-dir", str(out), "--device", "cuda"])
    ckpt = load_checkpoint_dict(out / "last_checkpoint.ckpt")
    assert ckpt["optimizer"]["param_groups"][0]["fused"] is True
    assert "peak_reserved_gb" in read_metrics(out)[-1] and "peak_reserved_gb" not in read_metrics(out)[0]


def test_the_test_set_is_scored_channels_last_as_in_training(tmp_path, monkeypatch):
    formats, real_evaluate = [], train.evaluate

    def evaluate(model, *args, **kwargs):
        conv = next(p for p in model.parameters() if p.dim() == 4 and p.shape[1] > 1)
        formats.append(conv.is_contiguous(memory_format=torch.channels_last))
        return real_evaluate(model, *args, **kwargs)

    monkeypatch.setattr(train, "evaluate", evaluate)
    train.main(TINY + ["--epochs", "1", "--out-dir", str(tmp_path / "run")])
    assert formats == [True, True]  # validation, then the best model on the test set


def test_cifar10_is_fetched_before_the_process_group_exists(tmp_path, monkeypatch):
    from utils import UserError

    events = []
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setattr(train, "load_cifar10", lambda data_dir: events.append("download"))

    def setup_distributed(device):
        events.append("process group")
        raise UserError("stop here")

    monkeypatch.setattr(train, "setup_distributed", setup_distributed)
    with pytest.raises(UserError, match="stop here"):
        train.train(*train.parse_args(["--data-dir", str(tmp_path / "data"), "--out-dir", str(tmp_path)]))
    assert events == ["download", "process group"]  # its wait has no timeout; a barrier's would
