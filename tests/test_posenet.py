"""The pose network: targets modulo the point group, its file, its training, and matching from its proposals."""

import mrcfile
import numpy as np
import pytest
import torch

from cryovae.config import validate_config
from cryovae.ctf import ctf_3d
from cryovae.errors import InputError
from cryovae.match import Matcher
from cryovae.model.io import save_record
from cryovae.model.posenet import (
    PoseNetwork, grid_angles_deg, grid_neighbourhoods, load_pose_network, pose_network_record, soft_argmax, soft_targets,
)
from cryovae.pose_training import particle_snr, train_pose_network
from cryovae.rotations import (
    axis_angle_matrix, geodesic_distance_deg, matrix_to_quaternion, random_rotations, so3_grid,
    symmetric_geodesic_distance_deg, symmetry_group,
)
from cryovae.simulate import ParticleDraws, ParticleSimulator, class_snr, simulate_volumes
from test_match import BOX, centred_box

CLASSES = ["1qvr", "1u6g", "3d2f"]


def test_a_symmetric_particle_is_as_near_every_mate_of_its_rotation():
    grid = so3_grid(30.0)
    group = symmetry_group("C2")
    rotation = grid[7] @ group[1].T   # a mate of grid point 7: the same C2 particle
    angles = grid_angles_deg(grid, rotation[None], [np.eye(3)[None], group], np.array([1]))
    assert angles[0, 7] == pytest.approx(0.0, abs=1e-4)
    plain = grid_angles_deg(grid, rotation[None], [np.eye(3)[None]], np.array([0]))
    assert plain[0, 7] == pytest.approx(180.0, abs=1e-3)


def test_soft_targets_are_distributions_peaked_at_the_nearest_grid_rotation():
    grid = so3_grid(20.0)
    rotations = random_rotations(5, np.random.default_rng(0))
    angles = grid_angles_deg(grid, rotations, [np.eye(3)[None]], np.zeros(5, dtype=int))
    targets = soft_targets(angles, 10.0)
    assert torch.allclose(targets.sum(1), torch.ones(5))
    assert np.array_equal(targets.argmax(1).numpy(), angles.argmin(1))


@pytest.mark.parametrize("group_name", ["C1", "C2", "C4"])
def test_soft_argmax_finds_the_rotation_between_the_grid_points(group_name):
    grid, group = so3_grid(20.0), symmetry_group(group_name)
    rotations = random_rotations(40, np.random.default_rng(0))
    angles = grid_angles_deg(grid, rotations, [group], np.zeros(40, dtype=int))
    estimate = soft_argmax(-0.5 * (angles / 10.0) ** 2, matrix_to_quaternion(grid[None] @ group[:, None]), 40.0)
    error = np.array([symmetric_geodesic_distance_deg(e, r, group) for e, r in zip(estimate, rotations)])
    assert np.median(angles.min(1)) > 7.0   # the best grid rotation alone
    assert error.max() < 3.0


@pytest.mark.parametrize("group_name", ["C1", "C4"])
def test_grid_neighbourhoods_hold_the_grid_rotations_within_the_radius_modulo_the_group(group_name):
    grid, group = so3_grid(30.0), symmetry_group(group_name)
    index, mate = grid_neighbourhoods(matrix_to_quaternion(grid[None] @ group[:, None]), 60.0)
    angles = grid_angles_deg(grid, grid, [group], np.zeros(len(grid), dtype=int))
    for b in range(len(grid)):
        assert set(index[b][index[b] >= 0]) == set(np.nonzero(angles[b] <= 60.0)[0])
    held = index >= 0   # each mate is the neighbour's rotation nearest b, on b's side of the quaternion sphere
    cos_half = np.einsum("gkq,gq->gk", mate, matrix_to_quaternion(grid))[held]
    assert (cos_half >= np.cos(np.radians(30.0)) - 1e-9).all()


def small_network(classes=CLASSES) -> PoseNetwork:
    torch.manual_seed(0)
    return PoseNetwork(BOX, classes, 30.0, [4, 8], 16)


def test_the_file_round_trip_predicts_the_same(tmp_path):
    net = small_network()
    path = tmp_path / "pose_network.pt"
    save_record(pose_network_record(net, [np.eye(3)[None]] * 3, {}, []), path)
    volumes = np.random.default_rng(0).standard_normal((3, BOX, BOX, BOX)).astype(np.float32)
    loaded = load_pose_network(path)
    assert loaded.classes == CLASSES
    assert torch.equal(net.predict(volumes)[0], loaded.predict(volumes)[0])
    torch.save({"format": "something else"}, tmp_path / "other.pt")
    with pytest.raises(InputError, match="not a cryovae pose network"):
        load_pose_network(tmp_path / "other.pt")


class Pointing(PoseNetwork):
    """A pose network whose logits rank one given rotation of every class first, per particle."""

    def point_at(self, rotations: np.ndarray) -> None:
        angles = grid_angles_deg(self.grid.double().numpy(), rotations, [np.eye(3)[None]], np.zeros(len(rotations), int))
        self.logits = torch.as_tensor(-angles, dtype=torch.float32)

    class_logits = None  # (C,): every particle's; None: all classes alike

    def forward(self, x):
        pose = self.logits[: len(x), None].expand(len(x), len(self.classes), self.n_grid)
        classes = torch.zeros(len(self.classes)) if self.class_logits is None else self.class_logits
        return pose + 0.0 * self.head.bias.sum(), classes.expand(len(x), len(self.classes))


@pytest.fixture(scope="module")
def noise_free(shrec_dir):
    config = validate_config({
        "structures": {c: f"demo:{c}" for c in CLASSES}, "box_size": BOX, "pixel_size_angstrom": 10.0,
        "simulation": {"snr": None, "ctf": True, "tilt_range_deg": [-60, 60], "max_shift_px": 0.0},
        "matching": {"coarse_keep": 1, "refine_top": 1, "starts": "network"},
    })
    maps = np.stack([centred_box(mrcfile.read(shrec_dir / "maps_10A" / f"{c}.mrc")) for c in CLASSES]).astype(np.float32)
    rng = np.random.default_rng(3)
    draws = ParticleDraws(np.zeros(6, dtype=int), random_rotations(6, rng), np.zeros((6, 3)), np.full(6, 3.0))
    volumes = simulate_volumes(config, maps, draws.class_index, draws, np.random.default_rng(1))
    ctf = ctf_3d(torch.as_tensor(draws.defocus_um), BOX, 10.0, 300.0, 2.7, 0.07)
    return config, maps, draws, volumes, ctf


def matched_rotation(config, maps, volumes, ctf, proposer):
    matcher = Matcher(config, dict(zip(CLASSES, maps)), (-60.0, 60.0), proposer=proposer)
    return matcher.match(volumes, ctf)["rotation"][:, 0]


def test_the_local_searches_start_where_the_network_points(noise_free):
    config, maps, draws, volumes, ctf = noise_free
    proposer = Pointing(BOX, CLASSES, 20.0, [4], 8)
    proposer.point_at(draws.rotation @ axis_angle_matrix(np.array([0.0, 0.0, 1.0]), np.radians(8.0)))
    near = geodesic_distance_deg(matched_rotation(config, maps, volumes, ctf, proposer), draws.rotation)
    assert near.max() < 4.0   # 8° off plus the grid's spacing: one local search from there finds the truth
    pointed = draws.rotation @ axis_angle_matrix(np.array([1.0, 0.0, 0.0]), np.radians(90.0))
    proposer.point_at(pointed)
    far = geodesic_distance_deg(matched_rotation(config, maps, volumes, ctf, proposer), draws.rotation)
    assert far.min() > 60.0   # a start 90° off stays there: the starts are the network's, not the grid's
    matcher = Matcher(config, dict(zip(CLASSES, maps)), (-60.0, 60.0), proposer=proposer)
    proposal = matcher.match(volumes, ctf)["proposal_rotation"][:, 0]   # the network's own best, written out
    assert geodesic_distance_deg(proposal, pointed).max() < 20.0


def without_global_search(config):
    settings = config.model_dump(mode="json")
    settings["matching"]["global_search"] = False
    settings["classification"]["features"] = settings["classification"]["unknown_features"] = ["fit"]
    return validate_config(settings)


def test_without_the_global_search_the_network_names_the_classes_and_the_confidence(noise_free):
    config, maps, draws, volumes, ctf = noise_free
    proposer = Pointing(BOX, CLASSES, 20.0, [4], 8)
    proposer.point_at(draws.rotation @ axis_angle_matrix(np.array([0.0, 0.0, 1.0]), np.radians(8.0)))
    matcher = Matcher(without_global_search(config), dict(zip(CLASSES, maps)), (-60.0, 60.0), proposer=proposer)
    assert not matcher.banks and np.isnan(matcher.self_margin).all()   # no global search is prepared
    proposer.class_logits = torch.tensor([0.0, 2.0, 0.0])   # the network's most probable class: 1u6g
    result = matcher.match(volumes, ctf)
    assert result["refined"][:, 1].all() and not result["refined"][:, [0, 2]].any()
    assert np.isnan(result["scores"]).all() and np.isnan(result["screen"]).all()
    assert result["proposal_class_probability"][:, 1] == pytest.approx(np.exp(2) / (2 + np.exp(2)))
    proposer.class_logits = torch.tensor([2.0, 0.0, 0.0])   # now the particles' own class
    result = matcher.match(volumes, ctf)
    assert geodesic_distance_deg(result["rotation"][:, 0], draws.rotation).max() < 4.0
    assert np.isfinite(result["fit"][:, 0]).all() and np.isnan(result["fit"][:, 1:]).all()
    # the pointing network's logits are minus the angle in degrees: all but e^-20 of the probability
    # lies within 30° of the pose, so the pose is determined, its spread under the grid's step
    assert (result["pose_margin"][:, 0] > 10.0).all() and result["pose_determined"][:, 0].all()
    assert (result["pose_spread_deg"][:, 0] < 20.0).all()
    proposer.logits = torch.zeros_like(proposer.logits)   # a flat distribution: nothing determined
    flat = matcher.match(volumes, ctf)
    assert (flat["pose_margin"][:, 0] < 0.0).all() and not flat["pose_determined"][:, 0].any()


def test_without_the_global_search_the_classifier_reads_no_template_score(noise_free):
    settings = noise_free[0].model_dump(mode="json")
    settings["matching"]["global_search"] = False
    settings["classification"]["features"] = ["template_relative", "fit"]
    with pytest.raises(InputError, match="template_relative"):
        validate_config(settings)
    settings["classification"]["features"] = ["fit"]
    settings["classification"]["unknown_features"] = ["fit"]
    settings["matching"]["starts"] = "grid"
    with pytest.raises(InputError, match="matching.starts: network"):
        validate_config(settings)


def test_the_density_chooses_among_the_mates_of_the_networks_pose(noise_free):
    """1qvr declared C2, which its map is not: the network points at a mate of the truth (it cannot
    tell mates apart), and matching, which starts from every mate, finds the truth itself."""
    config, maps, draws, volumes, ctf = noise_free
    settings = config.model_dump(mode="json")
    settings["alignment"]["symmetry"] = {"1qvr": "C2"}
    config = validate_config(settings)
    matcher = Matcher(config, dict(zip(CLASSES, maps)), (-60.0, 60.0), proposer=Pointing(BOX, CLASSES, 20.0, [4], 8))
    mate = draws.rotation @ matcher.symmetry["1qvr"][1]
    assert geodesic_distance_deg(mate, draws.rotation).min() > 170.0
    matcher.proposer.point_at(mate @ axis_angle_matrix(np.array([0.0, 0.0, 1.0]), np.radians(8.0)))
    assert geodesic_distance_deg(matcher.match(volumes, ctf)["rotation"][:, 0], draws.rotation).max() < 4.0


def test_matching_from_the_network_needs_one_trained_on_its_classes(noise_free):
    config, maps, *_ = noise_free
    with pytest.raises(InputError, match="give the pose network"):
        Matcher(config, dict(zip(CLASSES, maps)), (-60.0, 60.0))
    with pytest.raises(InputError, match="trained on classes"):
        Matcher(config, dict(zip(CLASSES, maps)), (-60.0, 60.0), proposer=small_network(["1qvr", "3d2f", "1u6g"]))


def test_training_writes_a_network_its_history_and_is_reproducible(noise_free, tmp_path):
    config, maps, *_ = noise_free
    paths = []
    for name in CLASSES:
        path = tmp_path / f"{name}.mrc"
        with mrcfile.new(path) as mrc:
            mrc.set_data(maps[CLASSES.index(name)])
            mrc.voxel_size = 10.0
        paths.append(path)
    small = config.model_copy(update={"pose_network": config.pose_network.model_copy(update={
        "samples": 48, "batch_size": 16, "validation_particles": 8, "channels": [4, 8], "hidden": 16,
        "step_deg": 30.0, "threads": 1, "device": "cpu"})})
    weights = []
    for run in ("a", "b"):
        train_pose_network(small, paths, tmp_path / f"{run}.pt", tmp_path / f"{run}.csv")
        weights.append(load_pose_network(tmp_path / f"{run}.pt").state_dict())
    history = (tmp_path / "a.csv").read_text().splitlines()
    assert history[0].split(",")[:4] == ["samples", "seconds", "loss", "val_median_deg"]
    assert [int(line.split(",")[0]) for line in history[1:]][-1] == 48
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_training_particles_draw_their_snr_from_the_range(noise_free):
    _, maps, draws, *_ = noise_free
    settings = {"structures": {c: f"demo:{c}" for c in CLASSES}, "box_size": BOX, "pixel_size_angstrom": 10.0,
                "simulation": {"snr": 0.5, "ctf": True, "max_shift_px": 0.0}}

    def simulator_for(snr_range, snr=0.5):
        config = validate_config(settings | {"simulation": settings["simulation"] | {"snr": snr},
                                             "pose_network": {"snr_range": snr_range}})
        return ParticleSimulator(config, maps, class_snr(config, CLASSES, maps)), config

    simulator, config = simulator_for([0.05, 5.0])
    snr = particle_snr(simulator, config, np.zeros(4000, dtype=int), np.random.default_rng(0))
    assert snr.min() >= 0.05 and snr.max() <= 5.0
    assert abs(np.mean(snr < 0.5) - 0.5) < 0.03   # log-uniform: half below the geometric mean
    assert particle_snr(*simulator_for(None), np.zeros(3, dtype=int), np.random.default_rng(0)) is None
    clean = simulate_volumes(noise_free[0], maps, draws.class_index, draws, np.random.default_rng(1))

    def agreement(level):
        simulator, config = simulator_for([level, level])
        snr = particle_snr(simulator, config, draws.class_index, np.random.default_rng(2))
        noisy = simulator.volumes(draws.class_index, draws, np.random.default_rng(2), snr)
        return np.mean([np.corrcoef(a.ravel(), b.ravel())[0, 1] for a, b in zip(noisy, clean)])

    assert agreement(5.0) > 0.85 > 0.35 > agreement(0.05)   # the drawn SNR is the one the noise has
    with pytest.raises(InputError, match="needs noise"):
        particle_snr(*simulator_for([0.1, 1.0], snr=None), np.zeros(3, dtype=int), np.random.default_rng(0))
    with pytest.raises(InputError, match="low <= high"):
        simulator_for([1.0, 0.1])
