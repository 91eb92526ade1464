"""The bundled demo model (mlx_eve/assets/eve-shapes, trained by examples/shapes/train.py) gives right
answers: the README's first command about the bundled image, and questions about images drawn afresh."""

import itertools
import subprocess
import sys

import pytest
from bundled_image import FACTS, IMAGE, README_ANSWER, README_QUESTION, ROOT, readme_first_command
from shapes_example import SHAPES_DIR, import_example

from mlx_eve import generate, load
from mlx_eve.chat import ChatSession
from mlx_eve.chat_app import EXAMPLE_QUESTIONS
from mlx_eve.demo import BUNDLED_MODEL


@pytest.fixture(scope="module")
def demo_model():
    return load(str(BUNDLED_MODEL))


# The questions README and the app show about the bundled image: these must be answered right.
EXAMPLES = [README_QUESTION, *EXAMPLE_QUESTIONS[IMAGE.name]]


def test_readme_first_command_answers_correctly():
    out = subprocess.run(
        [sys.executable, "generate.py", *readme_first_command()], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("==========")[0].strip() == README_ANSWER, out.stdout


@pytest.mark.parametrize("question", EXAMPLES)
def test_answers_the_example_questions_right(demo_model, question):
    assert generate(*demo_model, question, image=IMAGE, max_tokens=8).strip() == FACTS[question][1]


@pytest.mark.parametrize("first, question", list(itertools.permutations(EXAMPLES, 2)))
def test_answers_them_right_as_a_second_turn(demo_model, first, question):
    """After another example question about the same image, in any order, as in the chat app."""
    chat = ChatSession(*demo_model, IMAGE)
    assert "".join(r.text for r in chat.stream(first, max_tokens=8)).strip() == FACTS[first][1]
    assert "".join(r.text for r in chat.stream(question, max_tokens=8)).strip() == FACTS[question][1]


@pytest.mark.parametrize("question", list(FACTS))
def test_answers_are_words_of_the_right_kind(demo_model, question):
    """Right or wrong (see the model card for its accuracy), an answer is one of the words its question takes."""
    assert generate(*demo_model, question, image=IMAGE, max_tokens=8).strip() in FACTS[question][0]


def test_held_out_accuracy_on_images_drawn_afresh(demo_model, tmp_path):
    """A seed the training script never used; the threshold is well below the model's measured accuracy on
    its 1000-image test split (see mlx_eve/assets/eve-shapes/README.md), to catch a broken model or pipeline."""
    shapes_eval = import_example("evaluate")
    make = [sys.executable, str(SHAPES_DIR / "make_dataset.py"), "--out", str(tmp_path)]
    subprocess.run(
        [*make, "--train", "4", "--valid", "4", "--test", "80", "--seed", "2026", "--workers", "1"], check=True
    )
    result = shapes_eval.evaluate(*demo_model, shapes_eval.load_samples(tmp_path / "test.jsonl"), tmp_path)
    # 96.2 % here, 95.4 % on the 1000-image test split; chance: about 32 %.
    assert result["accuracy"] >= 0.85, result["by_type"]
