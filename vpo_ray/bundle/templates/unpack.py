"""Verify a vpo bundle against manifest.json and restore its xz/split wheels (stdlib only).

python unpack.py BUNDLE_DIR OUT_DIR [--no-verify]
"""
import hashlib, json, lzma, os, shutil, sys

def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(8 << 20), b""):
            h.update(block)
    return h.hexdigest()

def main(argv):
    bundle, out = argv[0], argv[1]
    verify = "--no-verify" not in argv
    manifest = json.load(open(os.path.join(bundle, "manifest.json")))
    if verify:
        for f in manifest["files"]:
            p = os.path.join(bundle, f["path"])
            if not os.path.isfile(p):
                sys.exit(f"unpack: {f['path']} is missing from the bundle")
            if os.path.getsize(p) != f["size"] or sha256(p) != f["sha256"]:
                sys.exit(f"unpack: {f['path']} is damaged (size or sha256 differs from manifest.json)")
    os.makedirs(out, exist_ok=True)
    for w in manifest["wheels"]:
        if w["stored_as"] == [w["wheel"]]:
            continue
        target = os.path.join(out, os.path.basename(w["wheel"]))
        tmp = target + ".partial"
        with open(tmp, "wb") as dst:
            readers = [open(os.path.join(bundle, p), "rb") for p in w["stored_as"]]
            try:
                class Cat:
                    def __init__(self, fs): self.fs = list(fs)
                    def read(self, n=-1):
                        while self.fs:
                            b = self.fs[0].read(n)
                            if b:
                                return b
                            self.fs.pop(0)
                        return b""
                with lzma.open(Cat(readers), "rb") as src:
                    shutil.copyfileobj(src, dst, 8 << 20)
            finally:
                for r in readers:
                    r.close()
        if verify and sha256(tmp) != w["sha256"]:
            os.unlink(tmp)
            sys.exit(f"unpack: {w['wheel']} restored with a wrong sha256")
        os.replace(tmp, target)
        print(f"unpack: restored {os.path.basename(target)}")

if __name__ == "__main__":
    main(sys.argv[1:])
