"""Distribution, the ground floor of the package (it imports nothing above it).

mesh         device mesh from config.mesh (data, fsdp, tensor; -1; multislice dcn_*), batch
             sharding, batch divisibility checks, global batch assembly per process.
sharding     logical axis rules as data (config.mesh.rules over the model's defaults), regex
             fallback for unannotated leaves, divisibility fallback (or strict errors), fsdp_fill.
distributed  jax.distributed start-up (explicit flags, TPU pods, clusters); loud failures.

Born-sharded states and the step programs are the run's (mmd_jax/runs); AOT and print_sharding
are tools above it (mmd_jax/tools).
"""
