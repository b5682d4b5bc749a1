# On the GPU box, sourced from the repo root after bench/gpu_box/stage.sh's two folders came
# over: installs the wheels into /tmp/site (once), writes a random-weight model with MiniLM-L6's
# architecture and tokenizer (the same compute; the real weights, 91 MB, would need two more
# calls) and its model config /tmp/minilm-random.yaml, and exports PYTHONPATH and PATH.
# Sourced, so no `set -e` (it would stay on in the caller): each step returns on failure.
PY=${PY:-python3}
STAGE=${STAGE:-/tmp/stage}
if [ ! -f /tmp/site/ray/__init__.py ]; then
  cat $STAGE/ray.part.a .dev2/ray.part.b > /tmp/ray-2.60.0-cp312-cp312-manylinux2014_x86_64.whl
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site \
      /tmp/ray-2.60.0-cp312-cp312-manylinux2014_x86_64.whl $STAGE/*.whl .dev2/*.whl || return 1
fi
export PYTHONPATH=/tmp/site:$PWD PATH=/tmp/site/bin:$PATH
$PY -c "import ray, ray.serve, fastapi, pydantic, transformers, torch; print('ray', ray.__version__, 'torch', torch.__version__, 'transformers', transformers.__version__, 'cuda', torch.cuda.is_available())" || return 1
$PY - <<'PYEOF'
import shutil, torch, yaml
from pathlib import Path
from transformers import BertConfig, BertModel
from app.serving.artifacts import artifact_digests
out = Path("/tmp/minilm-random")
if not (out / "model.safetensors").exists():
    torch.manual_seed(0)
    BertModel(BertConfig.from_json_file(".dev2/minilm/config.json")).save_pretrained(out, safe_serialization=True)
    for f in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(Path(".dev2/minilm") / f, out / f)
data = yaml.safe_load(Path("configs/models/recommender/v1.yaml").read_text())
data["artifact"] = str(out)
data["sha256"] = artifact_digests(out)
Path("/tmp/minilm-random.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
print("model config /tmp/minilm-random.yaml", data["sha256"])
PYEOF
[ -f /tmp/minilm-random.yaml ] || return 1
