#!/usr/bin/env python3
"""Writes the image files of the bad-input corpus (tests/corpus/images/) and their expected
outcomes (tests/corpus/images.tsv), read by tests/grpc/corpus.rs.

The files are committed; this script documents how each was made. Regenerate with
    python3 -m venv /tmp/pil && /tmp/pil/bin/pip install pillow==11.3.0
    /tmp/pil/bin/python tests/corpus/make_images.py
The expectations hold for the corpus test's limits: 100 000 image bytes, 40 000 header pixels.
"""
import io
import os
import random
import struct
import zlib

from PIL import Image

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "images")
ROWS = []  # (file, expected, message substring, what it is)


def picture(w=64, h=48, mode="RGB"):
    im = Image.new("RGB", (w, h))
    px = im.load()
    for y in range(h):
        for x in range(w):
            px[x, y] = ((x * 4) % 256, (y * 5) % 256, ((x + y) * 3) % 256)
    return im.convert(mode) if mode != "RGB" else im


def encode(im, fmt, **kw):
    b = io.BytesIO()
    im.save(b, fmt, **kw)
    return b.getvalue()


def put(name, data, expected, why, msg=""):
    with open(os.path.join(OUT, name), "wb") as f:
        f.write(data)
    ROWS.append((name, expected, msg, why))


def png_chunks(data):
    pos, out = 8, []
    while pos < len(data):
        (n,) = struct.unpack(">I", data[pos : pos + 4])
        kind = data[pos + 4 : pos + 8]
        out.append((kind, data[pos + 8 : pos + 8 + n]))
        pos += 12 + n
    return out


def png_from(chunks):
    out = b"\x89PNG\r\n\x1a\n"
    for kind, body in chunks:
        out += struct.pack(">I", len(body)) + kind + body
        out += struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)
    return out


def with_ihdr(png, w, h):
    chunks = png_chunks(png)
    kind, body = chunks[0]
    assert kind == b"IHDR"
    chunks[0] = (kind, struct.pack(">II", w, h) + body[8:])
    return png_from(chunks)


def jpeg_with_sof(jpg, w, h):
    b = bytearray(jpg)
    i = 2
    while i < len(b):
        assert b[i] == 0xFF
        marker = b[i + 1]
        (n,) = struct.unpack(">H", b[i + 2 : i + 4])
        if marker in (0xC0, 0xC1, 0xC2):
            b[i + 5 : i + 9] = struct.pack(">HH", h, w)
            return bytes(b)
        i += 2 + n
    raise ValueError("no SOF")


def main():
    os.makedirs(OUT, exist_ok=True)
    for f in os.listdir(OUT):
        os.remove(os.path.join(OUT, f))
    base = picture()
    png = encode(base, "PNG")
    jpg = encode(base, "JPEG", quality=90)

    # Accepted: every PNG and JPEG variant a client may send.
    put("rgb.png", png, "OK", "8-bit RGB PNG")
    put("rgba.png", encode(picture(mode="RGBA"), "PNG"), "OK", "RGBA PNG (alpha dropped)")
    put("grey.png", encode(picture(mode="L"), "PNG"), "OK", "8-bit greyscale PNG")
    put("grey16.png", encode(picture(mode="I;16"), "PNG"), "OK", "16-bit greyscale PNG")
    put("palette.png", encode(picture(mode="P"), "PNG"), "OK", "palette PNG")
    pal = picture(mode="P")
    put("palette_trns.png", encode(pal, "PNG", transparency=0), "OK", "palette PNG with tRNS")
    put("one_pixel.png", encode(picture(1, 1), "PNG"), "OK", "1x1 PNG")
    put("wide.png", encode(picture(200, 20), "PNG"), "OK", "10:1 aspect PNG (padded)")
    put("tall.jpg", encode(picture(20, 180), "JPEG"), "OK", "1:9 aspect JPEG (padded)")
    put("baseline.jpg", jpg, "OK", "baseline JPEG")
    put("progressive.jpg", encode(base, "JPEG", progressive=True), "OK", "progressive JPEG")
    put("grey.jpg", encode(picture(mode="L"), "JPEG"), "OK", "greyscale JPEG")
    put("cmyk.jpg", encode(picture(mode="CMYK"), "JPEG"), "OK", "CMYK JPEG")
    put("444.jpg", encode(base, "JPEG", subsampling=0), "OK", "4:4:4 JPEG")
    put("trailer.jpg", jpg + b"trailing bytes after EOI", "OK", "JPEG with bytes after EOI")

    bad = "INVALID_ARGUMENT"
    # Not PNG or JPEG.
    put("empty.png", b"", bad, "zero bytes", "empty")
    put("random.bin", bytes(random.Random(7).randrange(256) for _ in range(4096)), bad,
        "random bytes", "unknown image format")
    put("text.png", b"this is not an image\n" * 20, bad, "text named .png", "unknown image format")
    put("image.gif", encode(base, "GIF"), bad, "GIF (not accepted)", "unknown image format")
    put("image.webp", encode(base, "WEBP"), bad, "WebP (not accepted)", "unknown image format")
    put("image.bmp", encode(base, "BMP"), bad, "BMP (not accepted)", "unknown image format")
    put("image.tiff", encode(base, "TIFF"), bad, "TIFF (not accepted)", "unknown image format")
    # Truncated or corrupt.
    put("truncated_half.png", png[: len(png) // 2], bad, "PNG cut in half", "corrupt or truncated")
    put("truncated_header.png", png[:20], bad, "PNG cut inside IHDR", "")
    put("truncated_half.jpg", jpg[: len(jpg) // 2], bad, "JPEG cut in half", "truncated JPEG")
    put("truncated_eoi.jpg", jpg[:-2], bad, "JPEG without its end-of-image marker", "truncated JPEG")
    crc = bytearray(png)
    crc[-20] ^= 0xFF
    put("bad_crc.png", bytes(crc), bad, "PNG with a flipped byte (CRC mismatch)", "corrupt or truncated")
    chunks = png_chunks(png)
    chunks = [(k, (b[:10] + bytes(x ^ 0x5A for x in b[10:30]) + b[30:]) if k == b"IDAT" else b)
              for k, b in chunks]
    put("bad_zlib.png", png_from(chunks), bad, "PNG whose IDAT is corrupt (CRC fixed)",
        "corrupt or truncated")
    scan = bytearray(jpg)
    mid = len(scan) * 2 // 3
    for i in range(mid, mid + 40):
        if scan[i] != 0xFF and scan[i] ^ 0x55 != 0xFF:
            scan[i] ^= 0x55
    put("scrambled_scan.jpg", bytes(scan), "OK",
        "JPEG with scrambled entropy-coded bytes (decodes to wrong pixels, like libjpeg)")
    # Headers that lie about the size.
    put("claims_huge.png", with_ihdr(png, 60000, 60000), bad,
        "PNG header claims 60000x60000 (data is 64x48)", "over the limit of 40000 pixels")
    put("claims_taller.png", with_ihdr(png, 64, 480), bad,
        "PNG header claims 64x480 (data is 64x48)", "corrupt or truncated")
    put("claims_zero.png", with_ihdr(png, 0, 48), bad, "PNG header claims width 0", "")
    put("claims_huge.jpg", jpeg_with_sof(jpg, 60000, 60000), bad,
        "JPEG frame header claims 60000x60000", "over the limit of 40000 pixels")
    put("claims_larger.jpg", jpeg_with_sof(jpg, 160, 120), "OK",
        "JPEG frame header claims 160x120 but the scan holds 64x48: the scan ends at the "
        "end-of-image marker and the rest is filled, as libjpeg (a warning) and PIL do")
    # Over the limits.
    noise = Image.frombytes("RGB", (190, 190), random.Random(1).randbytes(190 * 190 * 3))
    put("over_bytes.png", encode(noise, "PNG"), bad, "108 KB of noise (limit 100 000 bytes)",
        "over the limit of 100000 bytes")
    put("over_pixels.png", encode(Image.new("RGB", (250, 200), (9, 9, 9)), "PNG"), bad,
        "250x200 = 50 000 pixels (limit 40 000)", "over the limit of 40000 pixels")

    with open(os.path.join(HERE, "images.tsv"), "w") as f:
        f.write("# file\texpected\tmessage contains\twhat it is\n")
        for row in ROWS:
            f.write("\t".join(row) + "\n")


if __name__ == "__main__":
    main()
