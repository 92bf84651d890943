"""The GAN step itself, in process (no Ray): frozen critic during the generator step, the weight average."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from epd_ray.checkpoints import (build_from_record, draw_readers, emotion_verifiers, expression_tellers,
                                 load_deidentifier, network_record)
from epd_ray.core.losses import LossWeights, discriminator_loss
from epd_ray.core.networks import EmotionVerifier, IdentityVerifier, PatchDiscriminator, ResNetClassifier, UNetGenerator
from epd_ray.train.gan import GanSteps, ema_decay
from epd_ray.train.worker import WorkerSetup


def _steps(decay: float, weights: LossWeights = LossWeights(), verifier_views: bool = False,
           expressions: int = 0) -> GanSteps:
    torch.manual_seed(0)
    generator = UNetGenerator(image_size=32, ngf=8, expressions=expressions)
    discriminator = PatchDiscriminator(ndf=8)
    verifiers = [IdentityVerifier(4, 32, 0.125).eval().requires_grad_(False),
                 EmotionVerifier().eval().requires_grad_(False)]
    setup = WorkerSetup(0, 1, torch.device("cpu"), "fp32", channels_last=False)
    return GanSteps(generator, discriminator, *verifiers, torch.optim.Adam(generator.parameters(), lr=1e-2),
                    torch.optim.Adam(discriminator.parameters(), lr=1e-2), weights, setup, ema_decay=decay,
                    verifier_views=verifier_views)


READER = draw_readers({"emotion_verifier": network_record("emotion_verifier", EmotionVerifier())})


def _batch():
    g = torch.Generator().manual_seed(1)
    return (torch.rand(4, 3, 32, 32, generator=g) * 2 - 1, torch.rand(4, 3, 32, 32, generator=g) * 2 - 1,
            torch.tensor([0, 1, 2, 3]), torch.tensor([0, 1, 2, 3]))


def test_the_discriminator_gets_only_its_own_gradients_and_stays_trainable():
    steps = _steps(0.0)
    reference = copy.deepcopy(steps.discriminator)
    x, y, identity, emotion = _batch()
    steps.step(x, y, identity, emotion)
    assert all(p.requires_grad for p in steps.discriminator.parameters())
    # D's gradients are exactly those of the discriminator loss: the generator step added nothing.
    fake = _steps(0.0).generator(x)  # same initial G, same noise draw as the step's first forward
    discriminator_loss(reference(x, y), reference(x, fake.detach())).backward()
    for p, q in zip(steps.discriminator.parameters(), reference.parameters()):
        assert torch.allclose(p.grad, q.grad, atol=1e-6)


@pytest.mark.parametrize("diversity", [0.0, 0.5])
def test_with_a_diversity_weight_each_face_is_drawn_twice_and_the_draws_compared(diversity):
    steps = _steps(0.0, LossWeights(diversity=diversity))
    drawn = []
    steps.generator.register_forward_hook(lambda module, args, out: drawn.append(len(out)))
    x, y, _, emotion = _batch()
    steps.step(x, y, torch.tensor([0, 0, 1, 2]), emotion)
    assert drawn == [8 if diversity else 4]
    losses = steps.round_losses()
    # photographs 0 and 1 are one person, and with two draws every face is a pair with its other draw
    assert 0.0 < losses["loss_diversity"] <= 1.0


@pytest.mark.parametrize("views", [False, True])
def test_with_verifier_views_v_and_s_read_one_transformed_view_of_each_draw_and_g_learns_through_it(views):
    # lambda1 = 0: no adversarial or SSIM term, so all G's gradient comes through what V and S read
    steps = _steps(0.0, LossWeights(lambda1=0.0), verifier_views=views)
    seen: dict[str, torch.Tensor] = {}

    def keep(name: str):
        def hook(module, args, out) -> None:  # the first call only: G's draw, then what V and S read of it
            seen.setdefault(name, (out if name == "fake" else args[0]).detach().clone())
        return hook

    for name, module in (("fake", steps.generator), ("identity", steps.identity_verifier),
                         ("emotion", steps.emotion_verifier)):
        module.register_forward_hook(keep(name))
    steps.step(*_batch())
    assert torch.equal(seen["identity"], seen["emotion"])  # both judge the same view
    assert torch.equal(seen["identity"], seen["fake"]) is not views
    assert seen["identity"].shape == seen["fake"].shape and seen["identity"].abs().max() <= 1
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in steps.generator.parameters())


def test_the_published_generator_is_the_moving_average_of_the_weights():
    steps = _steps(0.9)
    before = [p.detach().clone() for p in steps.generator_ema.parameters()]
    steps.step(*_batch())
    after_step = list(steps.generator.parameters())
    for ema, old, new in zip(steps.published_generator.parameters(), before, after_step):
        assert torch.allclose(ema, 0.9 * old + 0.1 * new.detach(), atol=1e-6)
    assert not steps.published_generator.training
    payload = steps.checkpoint_payload(0, 1, 0.35, _experiment(), {}, READER)
    assert set(payload["networks"]) == {"generator", "generator_train", "discriminator"}
    published, raw = (payload["networks"][k]["state_dict"] for k in ("generator", "generator_train"))
    assert published.keys() == raw.keys()
    assert any(not torch.equal(published[k], raw[k]) for k in published)


def test_without_an_average_the_raw_generator_is_published():
    steps = _steps(0.0)
    assert steps.generator_ema is None and steps.published_generator is steps.generator
    payload = steps.checkpoint_payload(0, 1, 0.35, _experiment(), {}, READER)
    assert set(payload["networks"]) == {"generator", "discriminator"}


def test_with_several_draws_a_checkpoint_carries_the_readers_that_pick_between_them():
    """The pickers pick, each reading a face once; without pickers S, the verifier the generator was trained
    through, over six views (core/draws.py)."""
    torch.manual_seed(0)
    pickers = {f"expression_picker_{i}": network_record("expression_picker", ResNetClassifier(7, 4, grey=True))
               for i in range(2)}
    pretrained = {"emotion_verifier": network_record("emotion_verifier", EmotionVerifier()), **pickers}
    steps = _steps(0.0)
    for networks, members, views in ((pretrained, list(pickers.values()), False),
                                     ({"emotion_verifier": pretrained["emotion_verifier"]},
                                      [pretrained["emotion_verifier"]], True)):
        payload = steps.checkpoint_payload(0, 1, 0.35, _experiment({"model.draws": 3}), {}, draw_readers(networks))
        assert payload["draws"] == 3 and set(payload["networks"]) == {"generator", "expression_reader", "discriminator"}
        deidentifier = load_deidentifier(payload, "checkpoint")
        assert deidentifier.draws == 3 and deidentifier.reader.views is views
        assert len(deidentifier.reader.members) == len(members)
        for member, record in zip(deidentifier.reader.members, members):
            assert all(torch.equal(value, record["state_dict"][key]) for key, value in member.state_dict().items())


def test_a_generator_told_the_expression_learns_it_from_the_labels_and_publishes_with_its_readers_and_tellers():
    """`model.expression_input`: G(x, e, z) is told each face's label in training; its checkpoint carries the
    readers, even for one draw, and the tellers that read e in the original at publication (S, its siblings and
    the pickers); a checkpoint written before the tellers lets the readers tell."""
    steps = _steps(0.0, expressions=7)
    code = steps.generator.downs[0][0].weight[:, 3:]
    with torch.no_grad():
        code.zero_()  # as from the warm start
    x, y, identity, _ = _batch()
    told = []
    hook = steps.generator.register_forward_pre_hook(lambda _module, args: told.append(args[1]))
    steps.step(x, y, identity, torch.tensor([4, 5, 6, 0]))
    hook.remove()
    assert [t.tolist() for t in told] == [[4, 5, 6, 0]]
    assert code.abs().sum() > 0  # the expression channels learn from the first step
    told_exp = _experiment({"model.expression_input": True})
    payload = steps.checkpoint_payload(0, 1, 0.35, told_exp, {}, READER)
    assert payload["draws"] == 1 and set(payload["networks"]) == {"generator", "expression_reader", "discriminator"}
    deidentifier = load_deidentifier(payload, "checkpoint")  # written before the tellers: the readers tell
    assert deidentifier.draws == 1 and deidentifier.reader is not None and deidentifier.generator.expressions == 7
    assert deidentifier.teller is None
    with torch.no_grad():
        reading = deidentifier.read(x).argmax(1)
        torch.manual_seed(5)
        published = deidentifier(x)
        torch.manual_seed(5)
        assert torch.equal(published, deidentifier.generator(x, reading))
    pretrained = {name: network_record(kind, module) for name, kind, module in (
        ("emotion_verifier", "emotion_verifier", EmotionVerifier()),
        ("emotion_verifier_1", "emotion_verifier", EmotionVerifier()),
        ("expression_picker_0", "expression_picker", ResNetClassifier(7, 4, grey=True)),
        ("emotion_evaluator", "emotion_evaluator", ResNetClassifier(7, 4, grey=True)))}
    tellers = expression_tellers(pretrained)
    assert [m["kind"] for m in tellers["config"]["members"]] == ["emotion_verifier"] * 2 + ["expression_picker"]
    assert not tellers["config"]["views"]  # without pickers S and its siblings read over six views, as S picks
    assert expression_tellers({k: v for k, v in pretrained.items() if k != "expression_picker_0"})["config"]["views"]
    payload = steps.checkpoint_payload(0, 1, 0.35, told_exp, {}, draw_readers(pretrained), tellers)
    assert set(payload["networks"]) == {"generator", "expression_reader", "expression_teller", "discriminator"}
    deidentifier = load_deidentifier(payload, "checkpoint")
    assert len(deidentifier.teller.members) == 3 and len(deidentifier.reader.members) == 1
    assert "expression_teller" not in _steps(0.0).checkpoint_payload(0, 1, 0.35, _experiment({"model.draws": 2}), {},
                                                                      READER, tellers)["networks"]


def test_l_ce_reads_through_s_alone_or_through_the_mean_probability_of_s_and_its_siblings():
    torch.manual_seed(0)
    siblings = {name: network_record("emotion_verifier", EmotionVerifier())
                for name in ("emotion_verifier", "emotion_verifier_1", "emotion_verifier_2")}
    picker = {"expression_picker_0": network_record("expression_picker", ResNetClassifier(7, 4, grey=True))}
    alone = {"emotion_verifier": siblings["emotion_verifier"], **picker}
    assert emotion_verifiers(alone) is alone["emotion_verifier"]
    ensemble = build_from_record(emotion_verifiers({**siblings, **picker})).eval()
    singles = [build_from_record(record).eval() for record in siblings.values()]
    x = torch.rand(3, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        mean = torch.stack([torch.softmax(net(x), dim=1) for net in singles]).mean(0)
        assert torch.allclose(ensemble(x).exp(), mean, atol=1e-6)  # the picker is not among them


def _experiment(overrides: dict | None = None):
    from epd_ray.config import load_config
    return load_config("smoke", overrides or {})


@pytest.mark.parametrize("half_life, expected", [(0.0, 0.0), (20.0, 0.5 ** (1 / 20)), (40.0, 0.5 ** (1 / 40))])
def test_ema_decay_halves_the_weight_of_the_past_after_the_half_life(half_life, expected):
    assert ema_decay(half_life) == pytest.approx(expected)
    if half_life:
        assert ema_decay(half_life) ** half_life == pytest.approx(0.5)  # at any data size or batch size


def test_the_real_pair_is_another_person_with_the_same_expression_or_the_nearest_fallback():
    from epd_ray.data.shards import FaceArrays
    from epd_ray.train.worker import RealPairPool

    identity = np.array([0, 0, 1, 1, 2, 2])
    emotion = np.array([3, 5, 3, 4, 3, 4])      # emotion 5 is shown by person 0 only
    pixels = np.stack([np.full((4, 4, 3), i, np.uint8) for i in range(6)])  # pixel value = row index
    pool = RealPairPool(FaceArrays(pixels, identity, emotion), "other_identity_same_emotion", seed=0)
    for _ in range(20):
        rows = pool.sample(torch.tensor([0, 1, 0]), torch.tensor([3, 4, 5]))[:, 0, 0, 0].numpy()
        assert identity[rows[0]] != 0 and emotion[rows[0]] == 3
        assert identity[rows[1]] != 1 and emotion[rows[1]] == 4
        assert identity[rows[2]] != 0          # nobody else is happy-5: another person, any expression


def test_augmentation_mirrors_and_shifts_faces_without_changing_their_content_otherwise():
    from epd_ray.data.stream import draw_jitter, jitter_pixels

    faces = np.random.default_rng(0).integers(0, 256, size=(64, 8, 8, 3), dtype=np.uint8)
    draw = draw_jitter(len(faces), flip=True, max_shift=0, rng=np.random.default_rng(1))
    mirrored = jitter_pixels(faces, draw)
    for face, out, flip in zip(faces, mirrored, draw["mirrored"]):
        assert np.array_equal(out, face[:, ::-1] if flip else face)
    assert 16 < draw["mirrored"].sum() < 48
    draw = draw_jitter(len(faces), flip=False, max_shift=2, rng=np.random.default_rng(2))
    assert not draw["mirrored"].any() and np.abs(draw["shift_y"]).max() == np.abs(draw["shift_x"]).max() == 2
    shifted = jitter_pixels(faces, draw)
    i = int(np.flatnonzero((draw["shift_y"] == 1) & (draw["shift_x"] == -1))[0])
    assert np.array_equal(shifted[i, 1:, :-1], faces[i, :-1, 1:])  # content moved 1 px down and 1 px left
    assert np.array_equal(jitter_pixels(faces, draw_jitter(len(faces), flip=False, max_shift=0,
                                                           rng=np.random.default_rng(3))), faces)


def test_the_real_pair_is_mirrored_and_shifted_exactly_as_its_x():
    """Drawn apart, real pairs were offset against each other while (x, G(x)) never is: D's giveaway."""
    from epd_ray.data.shards import FaceArrays
    from epd_ray.data.stream import JITTER_COLUMNS, _augment
    from epd_ray.train.worker import RealPairPool

    rng = np.random.default_rng(0)
    face = rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
    # the only real pair of person 0's expression 3 is person 1's face, here the same picture as x
    pool = RealPairPool(FaceArrays(np.stack([face, face]), np.array([0, 1]), np.array([3, 3])),
                        "other_identity_same_emotion", seed=0)
    batch = _augment({"pixels": np.stack([face] * 32), "identity": np.zeros(32, np.int64),
                      "emotion": np.full(32, 3, np.int64)}, flip=True, max_shift=2)
    assert set(JITTER_COLUMNS) <= set(batch)
    jitter = {k: batch[k] for k in JITTER_COLUMNS}
    y = pool.sample(torch.zeros(32, dtype=torch.long), torch.full((32,), 3), jitter).numpy()
    assert np.array_equal(y, batch["pixels"])
    assert len({(m, a, b) for m, a, b in zip(*jitter.values())}) > 4  # and the draws do vary
    assert np.array_equal(pool.sample(torch.zeros(2, dtype=torch.long), torch.full((2,), 3)).numpy(),
                          np.stack([face, face]))  # no jitter: the faces as they are


@pytest.mark.parametrize("told", [False, True])
def test_the_gan_loop_runs_in_process_rounds_reports_and_resumes(tmp_path, told):
    """GanRun, the loop every Ray Train worker runs, without Ray: a split in memory, a report hook; a run
    restored from its last payload goes on with the next round and the optimisers' state. A generator told
    the expression starts from the warm start's weights too."""
    from epd_ray.checkpoints import save_checkpoint
    from epd_ray.config import load_config
    from epd_ray.core.networks import build_network
    from epd_ray.data.prepare import prepare_dataset
    from epd_ray.train.gan import GanInputs, GanRun, trial_params
    from epd_ray.train.pretrain import network_specs
    from epd_ray.train.worker import ShardBatches

    exp = load_config("smoke", {"data.num_identities": 4, "data.variations": 3, "train.batch_size": 8,
                                "train.steps": 4, "train.report_every": 2, "verifiers.pickers": 1, "model.draws": 2,
                                "verifiers.emotion_verifiers": 2, "model.expression_input": told})
    data = prepare_dataset(exp.data, tmp_path / "data", echo=lambda *_: None).info
    specs = network_specs(exp.verifiers, exp.model, len(data.identities), data.image_size, len(data.emotions))
    save_checkpoint(tmp_path / "pretrained.pt", {"networks": {  # untrained: the loop's shape is what counts
        name: network_record(spec["kind"], build_network(spec["kind"], **spec["args"]))
        for name, spec in specs.items()}})
    inputs = GanInputs.put(tmp_path / "data", tmp_path / "pretrained.pt", exp.evaluation, put=lambda value: value)
    capped = GanInputs.put(tmp_path / "data", tmp_path / "pretrained.pt",
                           exp.evaluation.model_copy(update={"val_probes": 9}), put=lambda value: value).val_faces
    assert len(inputs.val_faces) > 9 and len(capped) == 8  # 2 of each of the 4 people, every round the same
    assert sorted(np.unique(capped.identity, return_counts=True)[1]) == [2, 2, 2, 2]
    setup = WorkerSetup(0, 1, torch.device("cpu"), "fp32", channels_last=False)
    weights, mu = trial_params({"experiment": exp.to_dict()})
    reports = []

    told_reads = []  # how many faces the tellers read in each validation round

    def train(start_round, payload=None, rounds_seen=None):
        run = GanRun(exp, weights, mu, setup, inputs, payload=payload)
        assert (run.teller is not None) == told
        if told:
            run.teller.register_forward_hook(lambda _module, args, _out: told_reads.append(len(args[0])))
        batches = ShardBatches.in_memory(setup, exp.train.batch_size, inputs.train_faces).forever(seed=0)
        run.train(batches, start_round=start_round, report=lambda m, p: reports.append((m, p)),
                  trained=rounds_seen.append if rounds_seen is not None else None)

    warm = GanRun(exp, weights, mu, setup, inputs).steps.generator.state_dict()["downs.0.0.weight"]
    assert warm.shape[1] == 3 + 7 * told and torch.equal(warm[:, :3], inputs.pretrained["generator"]["state_dict"][
        "downs.0.0.weight"]) and not warm[:, 3:].any()
    seen: list[int] = []
    train(0, rounds_seen=seen)
    assert [m["round"] for m, _ in reports] == [1, 2] and [m["step"] for m, _ in reports] == [2, 4] and seen == [0, 1]
    metrics, payload = reports[-1]
    assert 0.0 <= metrics["objective"] <= 1.0 and payload["round"] == 1 and payload["step"] == 4
    assert [m["kind"] for m in payload["networks"]["expression_reader"]["config"]["members"]] == ["expression_picker"]
    assert sum(told_reads) == 2 * len(inputs.val_faces) * told  # validation tells what the tellers read
    if told:  # S, its sibling and the picker read the expression it is told
        members = payload["networks"]["expression_teller"]["config"]["members"]
        assert [m["kind"] for m in members] == ["emotion_verifier"] * 2 + ["expression_picker"]
    else:
        assert "expression_teller" not in payload["networks"]
    exp = exp.model_copy(update={"train": exp.train.model_copy(update={"steps": 6})})  # `train` reads it
    reports.clear()
    train(2, payload=payload)
    assert [(m["round"], m["first_round"], m["step"]) for m, _ in reports] == [(3, 3, 6)]
    assert int(reports[0][1]["optimizers"]["generator"]["state"][0]["step"]) == 6  # went on from 4 steps
    # validation draws its own z: a run scored every 2 steps trains as one scored every 4, and scores a model the same
    trained = []
    for every in (2, 4):
        torch.manual_seed(5)
        run = GanRun(exp.model_copy(update={"train": exp.train.model_copy(update={"steps": 4, "report_every": every})}),
                     weights, mu, setup, inputs)
        reports.clear()
        batches = ShardBatches.in_memory(setup, exp.train.batch_size, inputs.train_faces).forever(seed=0)
        run.train(batches, start_round=0, report=lambda m, p: reports.append((m, p)))
        trained.append((run.steps.generator.state_dict(), reports[-1][0]))
    (every_2, scored_2), (every_4, scored_4) = trained
    assert all(torch.equal(every_2[k], every_4[k]) for k in every_2)
    assert scored_2["objective"] == scored_4["objective"] and scored_2["ssim"] == scored_4["ssim"]
    # only rank 0 scores the rounds: another rank builds no readers, tellers or judges and reports no checkpoint
    other_setup = WorkerSetup(1, 2, torch.device("cpu"), "fp32", channels_last=False)
    other = GanRun(exp, weights, mu, other_setup, inputs)
    assert other.reader is None and other.teller is None and other.judges is None
    reports.clear()
    other.train(ShardBatches.in_memory(other_setup, exp.train.batch_size, inputs.train_faces).forever(seed=0),
                start_round=2, report=lambda m, p: reports.append((m, p)))
    assert [(m["round"], p) for m, p in reports] == [(3, None)] and "objective" not in reports[0][0]
