"""moto_server with one request at a time.

DynamoDB applies a conditional write atomically; moto's threaded server does not (two
concurrent conditional updates can both pass their condition). The tests rely on DynamoDB's
guarantee to prove that concurrent workers never claim the same slice, so requests are
serialized here. Usage: python moto_atomic.py -H 127.0.0.1 -p PORT
"""

import argparse
import threading

from moto.moto_server.werkzeug_app import (
    DomainDispatcherApplication,
    MotoRequestHandler,
    create_backend_app,
)
from werkzeug.serving import run_simple


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("-H", "--host", default="127.0.0.1")
    parser.add_argument("-p", "--port", type=int, required=True)
    args = parser.parse_args()

    app = DomainDispatcherApplication(create_backend_app)
    lock = threading.Lock()

    def serialized(environ, start_response):
        with lock:
            # Consume the whole response inside the lock: the backend's work happens lazily.
            return list(app(environ, start_response))

    run_simple(args.host, args.port, serialized, threaded=True, request_handler=MotoRequestHandler)


if __name__ == "__main__":
    main()
