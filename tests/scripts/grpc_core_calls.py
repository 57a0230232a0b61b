#!/usr/bin/env python3
"""A gRPC client built on gRPC core (Debian's python3-grpcio), the C library that Python, Ruby,
PHP and C# clients share: it calls the sample Echo service through CHANNELS channels, one call
each, twice. Between the two rounds it waits for a line on stdin, so that the test can first check
what the agent did with the first round's connections.

Usage: grpc_core_calls.py HOST:PORT CHANNELS
Prints "round N: M answered" after each round; exits 1 on the first failed or wrong answer.
"""

import sys
from concurrent.futures import ThreadPoolExecutor

import grpc

METHOD = "/surge.sample.v1.Echo/Echo"


def varint(n):
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def payload(call_id):
    return ("call %03d;" % call_id).encode() * 64


def echo_request(call_id):
    """EchoRequest {id = 1: uint64, payload = 2: bytes}, encoded by hand (no generated code)."""
    body = payload(call_id)
    return b"\x08" + varint(call_id) + b"\x12" + varint(len(body)) + body


def fields(message):
    """The varint and length-delimited fields of a protobuf message, by number."""
    out, i = {}, 0
    while i < len(message):
        key, i = read_varint(message, i)
        number, wire = key >> 3, key & 7
        if wire == 0:
            out[number], i = read_varint(message, i)
        elif wire == 2:
            length, i = read_varint(message, i)
            out[number], i = message[i:i + length], i + length
        else:
            raise ValueError("unexpected wire type %d" % wire)
    return out


def read_varint(b, i):
    n, shift = 0, 0
    while True:
        byte = b[i]
        i += 1
        n |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return n, i


def call(stub, call_id):
    reply = fields(stub(echo_request(call_id), timeout=30))
    if reply.get(1, 0) != call_id or reply.get(2) != payload(call_id):
        raise RuntimeError("call %d got the answer of call %s" % (call_id, reply.get(1)))


def round_of_calls(stubs, first_id):
    with ThreadPoolExecutor(max_workers=len(stubs)) as pool:
        futures = [pool.submit(call, stub, first_id + i) for i, stub in enumerate(stubs)]
        for f in futures:
            f.result()
    return len(futures)


def main():
    target, count = sys.argv[1], int(sys.argv[2])
    # No proxy from the environment: the calls go to the service address itself.
    options = [("grpc.enable_http_proxy", 0), ("grpc.use_local_subchannel_pool", 1)]
    channels = [grpc.insecure_channel(target, options=options) for _ in range(count)]
    stubs = [
        ch.unary_unary(METHOD, request_serializer=None, response_deserializer=None)
        for ch in channels
    ]
    try:
        print("round 1: %d answered" % round_of_calls(stubs, 0), flush=True)
        sys.stdin.readline()
        print("round 2: %d answered" % round_of_calls(stubs, 1000), flush=True)
    except Exception as e:  # noqa: BLE001 - any failure is the test's answer
        print("failed: %s" % e, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
