"""The local GCS emulator of the tests (``python -m tests.gcs_server`` takes the arguments of
``gcp-storage-emulator``), with two changes that make it behave as GCS does for our clients:

- object downloads carry the ``x-goog-generation`` and ``x-goog-metageneration`` headers that
  real GCS sends: tensorstore (Orbax's checkpoint arrays) reads an object's generation from them
  and refuses a download without one;
- connections are served by threads, so that a client holding an idle connection open (a test
  process between two reads) does not stall every other process; requests still run one at a
  time, as the emulator's storage expects.
"""

import http.server
import sys
import threading

from gcp_storage_emulator import __main__ as emulator
from gcp_storage_emulator import server
from gcp_storage_emulator.exceptions import NotFound
from gcp_storage_emulator.handlers import objects

_download = objects.download


def download_with_generation(request, response, storage, *args, **kwargs):
  _download(request, response, storage, *args, **kwargs)
  try:
    obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
  except NotFound:
    return
  response["x-goog-generation"] = str(obj.get("generation", "1"))
  response["x-goog-metageneration"] = str(obj.get("metageneration", "1"))


class _OneAtATime(server.Router):
  _lock = threading.Lock()

  def handle(self, method):
    with self._lock:
      return super().handle(method)


def _install() -> None:
  server.server.HTTPServer = http.server.ThreadingHTTPServer
  server.Router = _OneAtATime
  objects.download = download_with_generation  # media GETs routed through objects.get
  for _, handlers in server.HANDLERS:
    for method, handler in list(handlers.items()):
      if handler is _download:
        handlers[method] = download_with_generation


if __name__ == "__main__":
  _install()
  sys.exit(emulator.main(sys.argv[1:]))
