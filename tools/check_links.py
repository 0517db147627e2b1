#!/usr/bin/env python3
"""Checks the internal links of README.md and the book (docs/src/*.md): every relative link
names a file that exists, and every #anchor a heading of its target (mdBook's and GitHub's
rule: lower case, spaces to hyphens, punctuation dropped). External links are not fetched.
Exits 1 listing every broken link."""
import pathlib
import re
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^(```|~~~)")


def anchors(path):
    out, seen, fenced = set(), {}, False
    for line in path.read_text(encoding="utf-8").splitlines():
        if FENCE.match(line):
            fenced = not fenced
        if fenced or not line.startswith("#"):
            continue
        text = line.lstrip("#").strip()
        slug = re.sub(r"[^\w\- ]", "", text.lower()).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def links(path):
    fenced = False
    for no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if FENCE.match(line):
            fenced = not fenced
        if fenced:
            continue
        # Inline code is not a link.
        for m in LINK.finditer(re.sub(r"`[^`]*`", "", line)):
            yield no, m.group(1)


def main():
    files = [ROOT / "README.md", *sorted((ROOT / "docs/src").glob("*.md"))]
    broken = []
    for f in files:
        for no, target in links(f):
            if re.match(r"^[a-z]+:", target):
                continue
            name, _, anchor = target.partition("#")
            dest = (f.parent / name).resolve() if name else f
            where = f"{f.relative_to(ROOT)}:{no}: {target}"
            if not dest.exists():
                broken.append(f"{where}: no such file")
            elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                broken.append(f"{where}: no heading #{anchor} in {dest.relative_to(ROOT)}")
    summary = ROOT / "docs/src/SUMMARY.md"
    listed = {t for _, t in links(summary)}
    for f in (ROOT / "docs/src").glob("*.md"):
        if f.name != "SUMMARY.md" and f.name not in listed:
            broken.append(f"docs/src/{f.name}: not in SUMMARY.md (the book would leave it out)")
    for b in broken:
        print(b)
    print(f"check_links: {len(files)} files, {len(broken)} broken")
    return 1 if broken else 0


if __name__ == "__main__":
    sys.exit(main())
