"""`quant-mix.gguf` split into three files as llama.cpp's converters split a large model
(`--split-max-tensors 10`): the `gguf` Python package's own writer, given
`split_max_tensors`, writes `quant-mix-split-0000N-of-00003.gguf`, the metadata in the first
with `split.no`, `split.count` and `split.tensors.count` in each (no llmc code involved).

    python3 -m venv /tmp/gguf && /tmp/gguf/bin/pip install gguf==0.19.0 numpy
    /tmp/gguf/bin/python make_split_gguf.py   # writes the three files beside this one
"""

from pathlib import Path

import gguf

HERE = Path(__file__).parent


def main():
    reader = gguf.GGUFReader(HERE / "quant-mix.gguf")
    arch = reader.fields[gguf.Keys.General.ARCHITECTURE].contents()
    writer = gguf.GGUFWriter(HERE / "quant-mix-split.gguf", arch, split_max_tensors=10)
    for field in reader.fields.values():
        # The writer writes the architecture itself; `GGUF.*` are the reader's own fields.
        if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith("GGUF."):
            continue
        kind = field.types[0]
        sub = field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), kind, sub_type=sub)
    for t in reader.tensors:
        writer.add_tensor_info(t.name, t.data.shape, t.data.dtype, t.data.nbytes, t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for t in reader.tensors:
        writer.write_tensor_data(t.data, tensor_endianess=reader.endianess)
    writer.close()
    for path in sorted(HERE.glob("quant-mix-split-*.gguf")):
        print(path.name, path.stat().st_size, "bytes")


if __name__ == "__main__":
    main()
