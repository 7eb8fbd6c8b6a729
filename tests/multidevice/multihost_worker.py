"""One process of test_multihost.py: 2 processes x 4 CPU devices, one 8-device mesh.

Run as ``python tests/multidevice/multihost_worker.py PROCESS_ID PORT OUT_DIR``: trains a
few sharded LoRA steps of a small GPT-2 on an FSDP 4 x TP 2 mesh spanning both processes,
saves the adapter with ``lorax.save`` from every process and exports it for peft; process 0
writes the losses to OUT_DIR.
"""

import json
import os
import sys

os.environ["XLA_FLAGS"] = (
    "--xla_force_host_platform_device_count=4 --xla_backend_optimization_level=0"
)

import jax  # noqa: E402

jax.config.update("jax_cpu_collectives_implementation", "gloo")


def main() -> None:
    process_id, port, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    jax.distributed.initialize(f"localhost:{port}", num_processes=2, process_id=process_id)
    assert jax.process_count() == 2 and len(jax.devices()) == 8, jax.devices()

    import lorax
    from lorax.models import partitioning
    from tests.multidevice.multihost_setup import setup, train

    model, lp, ids = setup()
    mesh = partitioning.make_mesh("fsdp=4,tp=2")
    trained, losses = train(model, lp, ids, mesh, partitioning.RULES["fsdp_tp"])
    a = trained["ScanLayers"]["attn"]["c_attn"]["kernel"].a
    assert not a.is_fully_addressable  # the adapters really span both processes
    combined = lorax.combine(trained, lorax.split(lp)[1])
    lorax.save(os.path.join(out, "adapter"), combined)
    lorax.export_peft(os.path.join(out, "peft"), combined, model=model)  # written by process 0
    if jax.process_index() == 0:
        with open(os.path.join(out, "losses.json"), "w") as f:
            json.dump(losses, f)
    jax.distributed.shutdown()


if __name__ == "__main__":
    main()
