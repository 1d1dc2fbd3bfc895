"""Sharding: rules as data, mesh errors, parity of sharded steps with one device, FSDP memory,
and checkpoints restored onto another mesh. Uses the 8 fake CPU devices of tests/conftest.py."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from mmd_jax.diffusion.schedules import Schedule
from mmd_jax.distill import moment_matching as mm
from mmd_jax.distill import steps as distill_steps
from mmd_jax.models import build as model_build
from mmd_jax.models import embeddings
from mmd_jax.parallel import distributed
from mmd_jax.parallel import mesh as mesh_lib
from mmd_jax.parallel import sharding
from mmd_jax.parallel.mesh import MeshError
from mmd_jax.runs import common
from mmd_jax.tools import report
from mmd_jax.training import checkpoint as ckpt_lib
from mmd_jax.training import state as state_lib
from mmd_jax.training import steps as teacher_steps

AXES = {"data": 2, "fsdp": 4, "tensor": 2}
RULES = sharding.parse_rules("", base=embeddings.default_logical_rules())


def _mesh_config(data, fsdp, tensor, **extra):
  return ml_collections.ConfigDict(dict(data=data, fsdp=fsdp, tensor=tensor, **extra))


# ----------------------------------------------------------------------------------------------
# Rules as data
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape,names,want,notes", [
    # kernel: conv_in over fsdp, conv_out over tensor
    ((3, 3, 64, 128), ("conv_height", "conv_width", "conv_in", "conv_out"),
     ((), (), ("fsdp",), ("tensor",)), ()),
    # conv_in = 3 does not divide fsdp = 4: replicated with a note, and fsdp_fill moves fsdp to
    # the largest divisible dimension that is still free -- none here (conv_out has tensor).
    ((3, 3, 3, 64), ("conv_height", "conv_width", "conv_in", "conv_out"),
     ((), (), (), ("tensor",)), ("dim 2 (conv_in=3) does not divide over mesh axis fsdp=4",)),
    # a norm scale: replicated by the rules, fsdp_fill shards it
    ((64,), ("norm",), (("fsdp",),), ("fsdp_fill",)),
    # qkv: 3 never shards; heads over tensor; embed over fsdp
    ((64, 3, 4, 16), ("embed", "qkv", "heads", "head_dim"),
     (("fsdp",), (), ("tensor",), ()), ()),
])
def test_logical_rules_as_data(shape, names, want, notes):
  d = sharding.decide(path="p", shape=shape, dtype=jnp.float32, names=names, rules=RULES,
                      axis_sizes=AXES)
  assert d.axes == want
  for n in notes:
    assert any(n in x for x in d.notes), d.notes
  nbytes = int(np.prod(shape)) * 4
  assert d.per_device_bytes(AXES) == -(-nbytes // d.shards(AXES))


def test_config_rules_override_and_unknown_names():
  rules = sharding.parse_rules("conv_out=none,embed=fsdp+tensor", base=RULES.items())
  assert rules["conv_out"] == () and rules["embed"] == ("fsdp", "tensor")
  assert rules["conv_in"] == ("fsdp",)  # untouched
  with pytest.raises(sharding.ShardingRuleError, match="unknown logical axis 'conv_outt'"):
    sharding.parse_rules("conv_outt=tensor", base=RULES.items())
  with pytest.raises(sharding.ShardingRuleError, match="mesh axis 'model'"):
    sharding.parse_rules("conv_out=model", base=RULES.items())
  # a parameter carrying a logical name that no rule maps
  with pytest.raises(sharding.ShardingRuleError, match="'bogus'.*config.mesh.rules"):
    sharding.decide(path="enc/w", shape=(8, 8), dtype=jnp.float32, names=("bogus", "embed"),
                    rules=RULES, axis_sizes=AXES)
  # config.mesh.rules reach the runs' sharding options
  cfg = ml_collections.ConfigDict(dict(rules="heads=none"))
  assert common.sharding_options(cfg)["rules"]["heads"] == ()


def test_strict_mode_names_parameter_dimension_and_axis():
  with pytest.raises(sharding.ShardingRuleError,
                     match=r"down/conv/kernel \(3, 3, 3, 64\): dim 2 \(conv_in=3\).*fsdp=4"):
    sharding.decide(path="down/conv/kernel", shape=(3, 3, 3, 64), dtype=jnp.float32,
                    names=("conv_height", "conv_width", "conv_in", "conv_out"), rules=RULES,
                    axis_sizes=AXES, strict=True)


def test_default_rules_avoid_the_xla_conv_grad_bug_on_three_axis_meshes():
  conv = {"kernel": nn.LogicallyPartitioned(jax.ShapeDtypeStruct((3, 3, 64, 128), jnp.float32),
                                            ("conv_height", "conv_width", "conv_in", "conv_out")),
          "bias": nn.LogicallyPartitioned(jax.ShapeDtypeStruct((128,), jnp.float32),
                                          ("conv_out",))}
  dense = nn.LogicallyPartitioned(jax.ShapeDtypeStruct((64, 128), jnp.float32), ("embed", "mlp"))
  tree = {"conv": conv, "dense": dense}
  axes = lambda d, f, t, spec="": jax.tree_util.tree_map(
      lambda x: x.axes, sharding.decide_tree(
          tree, axis_sizes={"data": d, "fsdp": f, "tensor": t},
          **common.sharding_options(ml_collections.ConfigDict(dict(rules=spec)))),
      is_leaf=sharding.is_decision)
  split = {"conv": {"kernel": ((), (), ("fsdp",), ("tensor",)), "bias": (("tensor",),)},
           "dense": (("fsdp",), ("tensor",))}
  assert axes(1, 4, 2) == split
  assert axes(4, 1, 2)["conv"]["kernel"][3] == ("tensor",)  # data x tensor: exact too
  # all three axes > 1: conv_out loses tensor (the bias gets fsdp from fsdp_fill); dense keeps it
  assert axes(2, 2, 2) == {"conv": {"kernel": ((), (), ("fsdp",), ()), "bias": (("fsdp",),)},
                           "dense": (("fsdp",), ("tensor",))}
  # naming conv_out in config.mesh.rules overrides the workaround
  assert axes(2, 2, 2, "conv_out=tensor") == split
  dec = sharding.decide_tree(tree, rules=RULES, axis_sizes={"data": 2, "fsdp": 2, "tensor": 2})
  assert sharding.XLA_CONV_GRAD_BUG_NOTE in dec["conv"]["kernel"].notes
  assert not dec["dense"].notes


def test_xla_conv_grad_bug_is_still_there():
  """experiments/xla_repros/spmd_conv_grad_batch_order.py still gets a wrong input gradient: the
  single-device one with its batch shards permuted. When this fails, XLA fixed the bug: drop
  sharding.avoid_xla_conv_grad_bug, this test and the README paragraph on it."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  import pathlib  # pylint: disable=g-import-not-at-top
  path = (pathlib.Path(__file__).parents[1] / "experiments" / "xla_repros"
          / "spmd_conv_grad_batch_order.py")
  spec = importlib.util.spec_from_file_location("spmd_conv_grad_batch_order", path)
  repro = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(repro)
  for shardy in (True, False):
    errors = repro.run((2, 2, 2), shardy=shardy)
    assert errors["x"] > 0.1, ("XLA fixed it: drop the workaround "
                               f"(sharding.avoid_xla_conv_grad_bug) and this test ({errors})")
    assert errors["x_reordered"] < 1e-5, f"the XLA bug changed its symptom (shardy={shardy}): " \
        f"{errors}"


def test_regex_fallback_for_unannotated_leaves():
  fallback = sharding.parse_fallback(r"emb.*:replicate;.*/kernel:none,tensor;.*:auto")
  kw = dict(dtype=jnp.float32, names=None, rules=RULES, axis_sizes=AXES, fallback=fallback,
            fsdp_fill=False)
  assert sharding.decide(path="emb/table", shape=(1000, 64), **kw).axes == ((), ())
  assert sharding.decide(path="mlp/kernel", shape=(64, 32), **kw).axes == ((), ("tensor",))
  # auto: the largest dimension divisible by fsdp=4 (not the largest overall, 5003)
  assert sharding.decide(path="x/w", shape=(5003, 12, 8), **kw).axes == ((), ("fsdp",), ())
  assert sharding.decide(path="count", shape=(), **kw).source == "scalar"
  with pytest.raises(sharding.ShardingRuleError, match="bad regex"):
    sharding.parse_fallback("([:auto")


def test_tree_decisions_and_table_cover_every_leaf():
  tree = {"w": nn.LogicallyPartitioned(jax.ShapeDtypeStruct((64, 128), jnp.float32),
                                       ("embed", "mlp")),
          "imported": jax.ShapeDtypeStruct((16, 12), jnp.float32),
          "count": jax.ShapeDtypeStruct((), jnp.int32)}
  dec = sharding.decide_tree(tree, rules=RULES, axis_sizes=AXES)
  assert dec["w"].spec == jax.sharding.PartitionSpec("fsdp", "tensor")
  assert dec["imported"].axes == (("fsdp",), ())  # fallback 'auto'
  text = report.sharding_table(dec, axis_sizes=AXES)
  for s in ("w", "64x128", "(embed, mlp)", "(fsdp, tensor)", "4.00 KiB", "imported"):
    assert s in text, text


# ----------------------------------------------------------------------------------------------
# Meshes and batches
# ----------------------------------------------------------------------------------------------

def test_mesh_errors_name_the_numbers():
  with pytest.raises(MeshError, match="needs 3 devices but 8"):
    mesh_lib.make_mesh(_mesh_config(3, 1, 1))
  with pytest.raises(MeshError, match="At most one"):
    mesh_lib.make_mesh(_mesh_config(-1, -1, 1))
  with pytest.raises(MeshError, match="multiply to 3"):
    mesh_lib.make_mesh(_mesh_config(-1, 3, 1))
  mesh = mesh_lib.make_mesh(_mesh_config(4, 2, 1))
  with pytest.raises(MeshError, match=r"batch_size=12 does not divide over the 8 batch shards"):
    mesh_lib.check_batch_divisible(batch_size=12, mesh=mesh)
  mesh = mesh_lib.make_mesh(_mesh_config(1, 1, -1))
  with pytest.raises(MeshError, match="1 batch shards.*for 2 processes"):
    mesh_lib.check_batch_divisible(batch_size=8, mesh=mesh, num_processes=2)


def test_multislice_mesh_puts_slices_on_the_outer_factor():
  cfg = _mesh_config(1, -1, 2, dcn_data=2)
  mesh = mesh_lib.make_mesh(cfg)
  assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
  ids = np.vectorize(lambda d: d.id)(mesh.devices)
  # with fake devices the slices are consecutive blocks: slice 0 = devices 0..3
  assert set(ids[0].ravel()) == {0, 1, 2, 3} and set(ids[1].ravel()) == {4, 5, 6, 7}
  with pytest.raises(MeshError, match="3 slices"):
    mesh_lib.make_mesh(_mesh_config(1, -1, 1, dcn_fsdp=3))


def test_distributed_detection_and_flag_errors():
  assert distributed.detect({}) is None
  assert distributed.detect({"TPU_WORKER_HOSTNAMES": "localhost"}) is None
  assert "4 hosts" in distributed.detect({"TPU_WORKER_HOSTNAMES": "a,b,c,d"})
  assert "MEGASCALE" in distributed.detect({"MEGASCALE_NUM_SLICES": "2"})
  with pytest.raises(distributed.DistributedInitError, match="missing.*process_id"):
    distributed.initialize(coordinator_address="127.0.0.1:1234", num_processes=2)
  with pytest.raises(distributed.DistributedInitError, match="HOST:PORT"):
    distributed.initialize(coordinator_address="127.0.0.1", num_processes=2, process_id=0)
  assert distributed.initialize(environ={}) is False  # one process: nothing to start


# ----------------------------------------------------------------------------------------------
# Parity: sharded steps on 8 devices == the same steps on 1 device
# ----------------------------------------------------------------------------------------------

IMAGE = (8, 8, 1)
NUM_CLASSES = 4
BATCH = 8
MESHES = [(8, 1, 1), (4, 2, 1), (2, 2, 2)]
# The smallest UNet with every kind of layer: conv_in, mid res-attention-res, one up block with a
# skip concat, conv_out (num_res_blocks=0: no down blocks), class table; few layers = fast compiles.
MODEL = ml_collections.ConfigDict(dict(
    kind="unet", prediction="v", base_channels=16, channel_mult=(1,), num_res_blocks=0,
    attn_resolutions=(), head_dim=8, num_groups=4, dropout=0.0, dtype="float32", remat=False))
# Adam with a large eps: elementwise normalisation would turn float32 rounding noise in
# (analytically) near-zero gradients into full-size updates and hide real disagreements.
TX = optax.adam(1e-3, eps=1e-3)
# Compile at XLA backend optimisation level 0: half the compile time on CPU, and the sharded and
# single-device programs still go through the same SPMD partitioner.
FAST = {"xla_backend_optimization_level": 0}


def _mesh(shape):
  n = int(np.prod(shape))
  return mesh_lib.make_mesh(_mesh_config(*shape), jax.devices()[:n])


def _batch(seed):
  rng = np.random.default_rng(seed)
  return {"image": rng.uniform(-1, 1, (BATCH,) + IMAGE).astype(np.float32),
          "label": rng.integers(0, NUM_CLASSES, (BATCH,)).astype(np.int32)}


@pytest.fixture(scope="module")
def tiny():
  model = model_build.build_model(MODEL, data_shape=IMAGE, num_classes=NUM_CLASSES)
  boxed = jax.eval_shape(lambda: model.init({"params": jax.random.PRNGKey(0)},
                                            jnp.zeros((1,) + IMAGE), jnp.zeros((1,)),
                                            jnp.zeros((1,), jnp.int32), train=False))["params"]
  rng = np.random.default_rng(0)

  def fill(path, s):  # numpy fan-in init: no init compile, and no zero-initialised layers
    name = str(path[-1])
    if "scale" in name:
      return jnp.asarray(1.0 + 0.1 * rng.standard_normal(s.shape), jnp.float32)
    fan_in = int(np.prod(s.shape[:-1])) if len(s.shape) > 1 and "bias" not in name else 100
    return jnp.asarray(rng.standard_normal(s.shape) / np.sqrt(fan_in), jnp.float32)

  return model, jax.tree_util.tree_map_with_path(fill, nn.unbox(boxed))


def _close(a, b, what, rtol=2e-5, atol=2e-6):
  for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol, err_msg=what)


def _check_sharded(tree_shardings, mesh):
  """The layout really splits something over every mesh axis of size > 1."""
  used = {a for s in jax.tree_util.tree_leaves(tree_shardings) for e in s.spec if e
          for a in ((e,) if isinstance(e, str) else e)}
  assert {a for a, n in mesh.shape.items() if n > 1 and a != "data"} <= used


def _teacher_shardings(model, mesh):
  """(boxed abstract TrainState, its NamedShardings), as runs.teacher.TeacherRun computes them."""
  abstract = state_lib.abstract_state(model, TX, data_shape=IMAGE, num_classes=NUM_CLASSES)
  return abstract, common.shardings(abstract, mesh=mesh,
                                    options=common.sharding_options(None))


def _jit_step(step_fn, in_shardings, *, mesh):
  """step(state, ...) -> (state, metrics) jitted like runs.common.jit_program: the state (first
  argument) donated and returned in its shardings, the metrics replicated."""
  return jax.jit(step_fn, in_shardings=in_shardings,
                 out_shardings=(in_shardings[0], mesh_lib.replicated(mesh)),
                 donate_argnums=(0,), compiler_options=FAST)


def _teacher_run(model, params, mesh, num_steps=3):
  step_fn = teacher_steps.make_teacher_step(
      model=model, tx=TX, schedule=Schedule(), prediction="v", loss_weighting="v",
      num_classes=NUM_CLASSES, cond_drop_prob=0.25, ema_decay=0.9)
  _, sh = _teacher_shardings(model, mesh)
  _check_sharded(sh.params, mesh)
  copy = lambda t: jax.tree_util.tree_map(lambda a: jnp.array(a, copy=True), t)
  state = state_lib.TrainState(step=jnp.zeros((), jnp.int32), params=copy(params),
                               opt_state=TX.init(params), ema_params=copy(params),
                               nonfinite_step=jnp.full((), -1, jnp.int32))
  state = jax.device_put(state, sh)  # donated below: no buffer shared with `params`
  step = _jit_step(step_fn, (sh, mesh_lib.batch_sharding(mesh), mesh_lib.replicated(mesh)),
                   mesh=mesh)
  losses = []
  for i in range(num_steps):
    state, metrics = step(state, mesh_lib.global_batch(_batch(i), mesh=mesh),
                          jax.random.PRNGKey(7))
    losses.append(float(metrics["loss"]))
  assert state.params["conv_in"]["kernel"].sharding == sh.params["conv_in"]["kernel"]
  return losses, jax.device_get(state)


def test_teacher_step_parity_over_meshes(tiny):
  model, params = tiny
  ref_losses, ref_state = _teacher_run(model, params, _mesh((1, 1, 1)))
  for shape in MESHES:
    losses, state = _teacher_run(model, params, _mesh(shape))
    np.testing.assert_allclose(losses, ref_losses, rtol=2e-5, err_msg=str(shape))
    _close(state.params, ref_state.params, f"params on mesh {shape}")
    _close(state.opt_state, ref_state.opt_state, f"adam state on mesh {shape}")


def _distill_config(variant):
  c = mm.default_config()
  c.update(variant=variant, num_student_steps=2, batch_size=BATCH)
  return c


def _distill_run(model, teacher, student, variant, mesh, *, born_sharded, num_steps=2):
  config = _distill_config(variant)
  denoise = distill_steps.make_x_predictor(model, "v")
  aux_tx = TX if variant == "alternating" else None
  step_fn = distill_steps.make_distill_step(
      config=config, denoise=denoise, schedule=Schedule(), student_tx=TX, aux_tx=aux_tx,
      data_key="image", null_label=NUM_CLASSES)
  # The shardings of runs.student.StudentRun: the teacher's (and a preconditioner's) like the
  # boxed parameters, the distillation state's from its boxed abstract tree.
  init = lambda p: distill_steps.init_distill_state(config=config, init_params=p, student_tx=TX,
                                                    aux_tx=aux_tx)
  boxed = jax.eval_shape(lambda r: state_lib.init_params(
      model, rng=r, data_shape=IMAGE, num_classes=NUM_CLASSES), jax.random.PRNGKey(0))
  options = common.sharding_options(None)
  teacher_sh = common.shardings(boxed, mesh=mesh, options=options)
  state_sh = common.shardings(jax.eval_shape(init, boxed), mesh=mesh, options=options)
  teacher = jax.device_put(teacher, teacher_sh)
  if born_sharded:
    state = jax.jit(lambda p: nn.unbox(init(p)), in_shardings=(teacher_sh,),
                    out_shardings=state_sh)(student)
    assert jax.tree_util.tree_all(jax.tree_util.tree_map(
        lambda a, s: a.sharding == s, state, state_sh))
  else:
    state = jax.device_put(init(student), state_sh)
  with_precond = variant == "parameter_space"
  # step(state, teacher, batch, rng[, precond]): teacher and preconditioner sharded like params
  ins = (state_sh, teacher_sh, mesh_lib.batch_sharding(mesh), mesh_lib.replicated(mesh))
  step = _jit_step(step_fn, ins + ((teacher_sh,) if with_precond else ()), mesh=mesh)
  extra = (jax.device_put(jax.tree_util.tree_map(lambda p: jnp.full_like(p, 0.5), teacher),
                          teacher_sh),) if with_precond else ()
  history = []
  for i in range(num_steps):
    state, metrics = step(state, teacher, mesh_lib.global_batch(_batch(10 + i), mesh=mesh),
                          jax.random.PRNGKey(3), *extra)
    history.append({k: float(v) for k, v in metrics.items()})
  return history, jax.device_get(state)


@pytest.mark.parametrize("variant", ["alternating", "parameter_space"])
def test_distillation_step_parity(tiny, variant):
  model, params = tiny
  student = jax.tree_util.tree_map(lambda p: p * 0.9, params)  # teacher != student init
  ref_hist, ref_state = _distill_run(model, params, student, variant, _mesh((1, 1, 1)),
                                     born_sharded=False)
  hist, state = _distill_run(model, params, student, variant, _mesh((2, 2, 2)),
                             born_sharded=True)
  for k in ref_hist[0]:
    np.testing.assert_allclose([h[k] for h in hist], [h[k] for h in ref_hist], rtol=5e-5,
                               atol=1e-6, err_msg=k)
  _close(state.params, ref_state.params, f"{variant} student", rtol=5e-5, atol=5e-6)
  if variant == "alternating":
    _close(state.aux_params, ref_state.aux_params, "auxiliary", rtol=5e-5, atol=5e-6)


# ----------------------------------------------------------------------------------------------
# Memory and checkpoints
# ----------------------------------------------------------------------------------------------

def test_fsdp_per_device_state_memory_is_one_eighth(tiny):
  model, _ = tiny
  sizes = {}
  for shape in [(8, 1, 1), (1, 8, 1)]:
    mesh = _mesh(shape)
    _, sh = _teacher_shardings(model, mesh)
    init = jax.jit(lambda r: nn.unbox(state_lib._boxed_state(model, TX, r, IMAGE, NUM_CLASSES)),
                   out_shardings=sh, compiler_options=FAST)
    sizes[shape] = init.lower(jax.random.PRNGKey(0)).compile().memory_analysis() \
        .output_size_in_bytes
  replicated, fsdp = sizes[(8, 1, 1)], sizes[(1, 8, 1)]
  assert replicated > 100_000
  assert fsdp <= replicated / 8 * 1.05, (replicated, fsdp)


def test_checkpoint_restores_onto_another_mesh_and_device_count(tiny, tmp_path):
  model, params = tiny
  src_mesh = _mesh((1, 8, 1))
  _, src_sh = _teacher_shardings(model, src_mesh)
  state = state_lib.TrainState(step=jnp.array(5, jnp.int32), params=params,
                               opt_state=TX.init(params), ema_params=params,
                               nonfinite_step=jnp.full((), -1, jnp.int32))
  state = jax.device_put(state, src_sh)
  ckpt = ckpt_lib.Checkpointer(str(tmp_path), async_save=False)
  ckpt.save(5, state=state, data_state={"step": 5}, config_dict={"model": {}})
  ckpt.wait()
  for shape in [(2, 2, 2), (1, 1, 1)]:
    mesh = _mesh(shape)
    abstract, sh = _teacher_shardings(model, mesh)
    target = common.with_shardings(abstract, sh)
    restored, data_state = ckpt.restore(5, abstract_state=target)
    assert data_state == {"step": 5}
    kernel = restored.params["conv_in"]["kernel"]
    assert kernel.sharding == sh.params["conv_in"]["kernel"]
    assert len(kernel.sharding.device_set) == int(np.prod(shape))
    _close(jax.device_get(restored), jax.device_get(state), f"restored on {shape}", 0, 0)
  ckpt.close()
