"""LitServe streaming (stream=True): bench/streaming.py's peer for the items of a generator.

Run as ``python stream_app.py PORT`` with bench/ on PYTHONPATH (for stream_model). As
LitServe's documentation writes a streaming API (``LitAPI(stream=True)``): predict yields,
encode_response yields one dict per item, sent as a line of JSON; one inference worker, no
batching.
"""

import sys

import litserve as ls

import stream_model


class StreamAPI(ls.LitAPI):
    def setup(self, device):
        self.model = stream_model.load()

    def decode_request(self, request):
        return int(request["n"])

    def predict(self, n):
        yield from stream_model.predict(self.model, n)

    def encode_response(self, outputs):
        for item in outputs:
            yield {"output_0": item.tolist()}


if __name__ == "__main__":
    server = ls.LitServer(StreamAPI(stream=True), accelerator="cpu", workers_per_device=1,
                          timeout=300)
    server.run(host="127.0.0.1", port=int(sys.argv[1]), generate_client_file=False,
               access_log=False)
