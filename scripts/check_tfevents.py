#!/usr/bin/env python3
# Reads TensorBoard event files written by this crate (`train::metrics::TensorBoardWriter`)
# with TensorBoard's own EventAccumulator, and with a plain `struct` reader that checks the
# TFRecord framing and CRCs (so the check also runs without tensorboard installed).
#
# Pinned: tensorboard 2.21.0 (optional), Python 3.11.
# Make the input (from the repository root), then run:
#   INSTRUCT_PIX2PIX_EXPORT_DIR=/tmp/t3-export cargo test --test integration train_persist::
#   python scripts/check_tfevents.py /tmp/t3-export/tensorboard
# Any run's log folder works too (OUTPUT_DIR/logs/...).
import argparse
import glob
import os
import struct


def crc32c(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
    return crc ^ 0xFFFFFFFF


def masked(data: bytes) -> int:
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def records(path: str):
    with open(path, "rb") as f:
        data = f.read()
    pos = 0
    while pos < len(data):
        (length,) = struct.unpack_from("<Q", data, pos)
        (length_crc,) = struct.unpack_from("<I", data, pos + 8)
        assert length_crc == masked(data[pos : pos + 8]), f"bad length CRC at {pos}"
        payload = data[pos + 12 : pos + 12 + length]
        (crc,) = struct.unpack_from("<I", data, pos + 12 + length)
        assert crc == masked(payload), f"bad payload CRC at {pos}"
        yield payload
        pos += 16 + length


parser = argparse.ArgumentParser()
parser.add_argument("log_dir")
args = parser.parse_args()
files = sorted(glob.glob(os.path.join(args.log_dir, "events.out.tfevents.*")))
assert files, f"no event file in {args.log_dir}"
for path in files:
    print(f"{os.path.basename(path)}: {sum(1 for _ in records(path))} records, framing and CRCs OK")

try:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
except ImportError:
    print("tensorboard is not installed: EventAccumulator check skipped")
    raise SystemExit(0)

acc = EventAccumulator(args.log_dir)
acc.Reload()
tags = acc.Tags()["scalars"]
print(f"EventAccumulator scalar tags: {tags}")
for tag in tags:
    print(f"  {tag}: " + ", ".join(f"step {e.step} = {e.value:g}" for e in acc.Scalars(tag)))
raise SystemExit(0 if tags else 1)
