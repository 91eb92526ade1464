"""Ask a question about an image from Python, then a follow-up, streaming the answers.

python examples/ask.py   # the bundled demo model and image
python examples/ask.py --model BAAI/EVE-7B-HD-v2.0 --image photo.jpg -q "What is this?" -f "Why?"
"""

import argparse

from mlx_eve import load, stream_generate
from mlx_eve.demo import BUNDLED_MODEL, EXAMPLE_IMAGES

parser = argparse.ArgumentParser()
parser.add_argument("--model", default=str(BUNDLED_MODEL))
parser.add_argument("--image", default=str(EXAMPLE_IMAGES / "shapes.png"))
parser.add_argument("-q", "--question", default="Is the red circle on the left or on the right?")
parser.add_argument("-f", "--follow-up", default="What colour is the circle?")
args = parser.parse_args()

model, processor = load(args.model)
conversation = [{"role": "user", "content": args.question}]
for follow_up in [args.follow_up, None]:
    answer = ""
    for response in stream_generate(model, processor, conversation, image=args.image, max_tokens=64):
        print(response.text, end="", flush=True)
        answer += response.text
    print(f"\n[{response.prompt_tokens} prompt tokens, {response.generation_tps:.1f} tokens/s]\n")
    if follow_up is None:
        break
    conversation += [{"role": "assistant", "content": answer}, {"role": "user", "content": follow_up}]
