"""Distribution: meshes, sharding rules, born-sharded states, multi-host start-up, TPU AOT.

mesh         device mesh from config.mesh (data, fsdp, tensor; -1; multislice dcn_*), batch
             sharding, batch divisibility checks, global batch assembly per process.
sharding     logical axis rules as data (config.mesh.rules over the model's defaults), regex
             fallback for unannotated leaves, divisibility fallback (or strict errors), fsdp_fill.
layout       born-sharded teacher / distillation states and jits with explicit shardings.
distributed  jax.distributed start-up (explicit flags, TPU pods, clusters); loud failures.
report       the sharding table and per-device memory tables.
aot          compile a config's real step for a TPU topology on a CPU machine (libtpu).
cli          --mode=print_sharding and --mode=aot of mmd_jax.main.
"""
