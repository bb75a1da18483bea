"""Seal a model card: record its weights' size and the digest of its result-changing fields (card_sha256).

    python tools/seal_card.py Resources/Models/lidc-nodule.json

ARSegLib.models refuses a card whose result-changing fields (models.SEALED_FIELDS: name, weights, their sha256
and size, the engine configuration, crop size, pixel spacing, intensity, labels, modes) no longer match its
card_sha256, so an edited card cannot change results under the same model name. export_model seals the cards
it writes; this tool seals a card written before that, or one changed on purpose: a changed model gets a new
name; a shipped card whose sampling changes within its accuracy record (as lidc-nodule's selection_scale, 8
December) says what changed and why in training.sampling_choice, and every report names the card_sha256 it ran.
The weights must match the card's sha256: a card is never sealed to weights it does not describe. The weights
file is not touched.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ARSegLib.models import ModelError, card_digest, seal_card, sha256_file, validate_card  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("card", help="the model card (.json) to seal in place")
    card_path = Path(ap.parse_args(argv).card)
    data = json.loads(card_path.read_text())
    weights = card_path.parent / data["weights"]
    got = sha256_file(weights)
    if got != data.get("sha256"):
        raise SystemExit(f"seal_card: {weights} has sha256 {got}, the card says {data.get('sha256')}: not sealed")
    data["weights_bytes"] = weights.stat().st_size
    data["card_sha256"] = "0" * 64  # validated with a placeholder, then the real digest
    try:
        validate_card(card_path, data)
    except ModelError as e:
        raise SystemExit(f"seal_card: {e}") from None
    sealed = seal_card(data)
    card_path.write_text(json.dumps(sealed, indent=2) + "\n")
    print(f"sealed {card_path}: card_sha256 {card_digest(sealed)}, weights {data['weights_bytes']} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
