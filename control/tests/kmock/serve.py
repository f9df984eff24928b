"""Serves PyPI's kmock Kubernetes API emulator on 127.0.0.1, for control/tests/kmock.rs.

    python serve.py

Binds 127.0.0.1 port 0 (a free port chosen by the kernel), prints one line,
``kmock VERSION listening on 127.0.0.1:PORT``, then serves until its stdin
reaches end of file (the test that started it ended, however it ended) or it
gets SIGTERM or SIGINT.

Everything the server answers is kmock's own ``KubernetesEmulator``: this
script only declares the three resources serin's fleet mode uses (kmock lists a
resource only once it is declared or holds an object) and starts kmock's own
``Server``. It adds no emulation of its own, so the test sees kmock as it is.
"""

import asyncio
import importlib.metadata
import signal
import sys

import kmock


async def main() -> None:
    emulator = kmock.KubernetesEmulator()
    emulator.resources['serin.dev/v1alpha1/serinrollouts'] = kmock.ResourceInfo(
        kind='SerinRollout', singular='serinrollout', namespaced=True, subresources={'status'},
    )
    emulator.resources['coordination.k8s.io/v1/leases'] = kmock.ResourceInfo(
        kind='Lease', singular='lease', namespaced=True,
    )
    emulator.resources['v1/configmaps'] = kmock.ResourceInfo(
        kind='ConfigMap', singular='configmap', namespaced=True,
    )

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    stdin = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(stdin), sys.stdin)

    async with emulator, kmock.Server(emulator, host='127.0.0.1', port=0) as server:
        version = importlib.metadata.version('kmock')
        print(f"kmock {version} listening on {server.host}:{server.port}", flush=True)
        eof = asyncio.ensure_future(stdin.read())
        stopped = asyncio.ensure_future(stop.wait())
        await asyncio.wait({eof, stopped}, return_when=asyncio.FIRST_COMPLETED)
        eof.cancel()
        stopped.cancel()


if __name__ == '__main__':
    asyncio.run(main())
