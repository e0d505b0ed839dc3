"""The playground and the --html page in a real browser: Debian's chromium, headless, driven by
Selenium through Debian's chromium-driver (scripts/setup.sh installs both; nothing is downloaded).

The playground runs against a real server: `proxyclient serve`'s app on uvicorn in a thread, its
base the in-process OpenAI-dialect fixture over the tiny base (tests/support/dialect_servers.py:
real HTTP, no vLLM), the tiny expert and anti-expert local. `proxyclient generate` (in-process,
same base, same flags) gives the text the page must show, and the numbers hovering a token must
read. Screenshots go to the test's tmp path and to .cache/artefacts/test_browser/."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from proxyclient import ProxyTuner, connect, view
from proxyclient.cli import main
from proxyclient.server import create_app
from proxyclient.server.main import ServerThread
from tests.support.constants import REPO
from tests.support.dialect_servers import DialectServer

pytestmark = pytest.mark.slow

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
ARTEFACTS = REPO / ".cache" / "artefacts" / "test_browser"
BASE_KEY = "sk-browser-base-0123456789"
CLIENT_KEY = "sk-browser-client-0123456789"
PROMPT = "def main():"
ALPHA, K, TOKENS = 1.5, 5, 10


@pytest.fixture(scope="module")
def driver():
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        pytest.fail("no Debian chromium / chromium-driver: run scripts/setup.sh")
    from selenium import webdriver

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(flag)
    options.add_argument("--window-size=1280,900")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    service = webdriver.ChromeService(executable_path=str(CHROMEDRIVER))
    browser = webdriver.Chrome(service=service, options=options)
    browser.set_page_load_timeout(60)
    yield browser
    browser.quit()


@pytest.fixture(scope="module")
def base(tiny_models):
    with DialectServer("openai", tiny_models["base"], api_key=BASE_KEY) as running:
        yield running


@pytest.fixture(scope="module")
def served(base, tiny_models):
    adapter = connect(
        "openai", base.base_url, "tiny-base", api_key=BASE_KEY, tokenizer=str(tiny_models["base"])
    )
    tuner = ProxyTuner(adapter, tiny_models["expert"], tiny_models["anti_expert"], device="cpu")
    app = create_app(tuner, served_model_name="tiny-proxy", api_key=CLIENT_KEY, secrets=(BASE_KEY,))
    with ServerThread(app) as server:
        yield server
    tuner.close()


def generate(base, tiny_models, tmp_path, capsys, alpha: float, name: str, *source: str) -> dict:
    """`proxyclient generate --json --html`: its JSON (with the trace) and the page's path;
    ``source``: the prompt's flags (default: --prompt PROMPT)."""
    page = tmp_path / f"{name}.html"
    code = main([
        "generate", "--api", "openai", "--base-url", base.base_url, "--base-model", "tiny-base",
        "--base-api-key", BASE_KEY, "--expert", str(tiny_models["expert"]),
        "--anti-expert", str(tiny_models["anti_expert"]), "--device", "cpu", "--threads", "1",
        *(source or ("--prompt", PROMPT)), "--alpha", str(alpha), "--base-k", str(K),
        "--temperature", "0", "--max-new-tokens", str(TOKENS), "--json", "--html", str(page),
        "--trace-top", "5",
    ])  # fmt: skip
    out = capsys.readouterr()
    assert code == 0, out.err
    return {"result": json.loads(out.out), "page": page}


def screenshot(driver, tmp_path: Path, name: str) -> Path:
    path = tmp_path / f"{name}.png"
    assert driver.save_screenshot(str(path)), f"no screenshot {name}"
    ARTEFACTS.mkdir(parents=True, exist_ok=True)
    shutil.copy(path, ARTEFACTS / path.name)
    return path


def errors_in_console(driver) -> list[str]:
    return [e["message"] for e in driver.get_log("browser") if e["level"] == "SEVERE"]


def details(driver) -> dict[str, str]:
    """The details panel's fields (data-field: text) and its heading."""
    from selenium.webdriver.common.by import By

    panel = driver.find_element(By.CSS_SELECTOR, "[data-role=details]")
    fields = {
        dd.get_attribute("data-field"): dd.text for dd in panel.find_elements(By.TAG_NAME, "dd")
    }
    fields["heading"] = panel.find_element(By.TAG_NAME, "h2").text
    return fields


def numbers(step: dict) -> dict[str, str]:
    """What the details panel starts each number with for a trace step (3 decimals)."""
    return {
        "tuned": f"{step['logprob']:.3f}",
        "base": "outside" if step["base_logprob"] is None else f"{step['base_logprob']:.3f}",
        "expert": f"{step['expert_logprob']:.3f}",
        "anti": f"{step['anti_logprob']:.3f}",
    }


def assert_panel_shows(driver, step: dict) -> None:
    shown = details(driver)
    for field, start in numbers(step).items():
        assert shown[field].startswith(start), (field, shown[field], step)


def wait_for_state(driver, timeout: float = 180) -> str:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    status = driver.find_element(By.ID, "pg-status")
    WebDriverWait(driver, timeout).until(
        lambda _: status.get_attribute("data-state") in ("done", "error", "stopped")
    )
    return status.get_attribute("data-state")


def fits_the_window(driver) -> bool:
    return driver.execute_script(
        "return document.documentElement.scrollWidth <= window.innerWidth + 1"
    )


def test_playground_streams_the_cli_text_and_hovering_reads_its_numbers(
    driver, served, base, tiny_models, tmp_path, capsys
):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    steered = generate(base, tiny_models, tmp_path, capsys, ALPHA, "steered")["result"]
    alone = generate(base, tiny_models, tmp_path, capsys, 0.0, "alone")["result"]
    driver.set_window_size(1280, 900)
    driver.get(served.url + "/")
    find = driver.find_element

    def fill(element_id: str, value: object) -> None:
        field = find(By.ID, element_id)
        field.clear()
        field.send_keys(str(value))

    key = find(By.ID, "pg-key")
    assert key.is_displayed()  # the server has a key: the page asks for it
    fill("pg-prompt", PROMPT)
    fill("pg-alpha", ALPHA)
    fill("pg-k", K)
    fill("pg-temperature", 0)
    fill("pg-max-tokens", TOKENS)
    find(By.ID, "pg-compare").click()
    find(By.ID, "pg-generate").click()
    assert wait_for_state(driver) == "error"  # no key yet: the API's 401, said on the page
    assert "401" in find(By.ID, "pg-status").text

    key.send_keys(CLIENT_KEY)
    find(By.ID, "pg-generate").click()
    assert wait_for_state(driver) == "done", find(By.ID, "pg-status").text
    text_of = "return document.getElementById(arguments[0]).textContent"
    assert driver.execute_script(text_of, "pg-steered-text") == steered["text"]
    assert driver.execute_script(text_of, "pg-base-text") == alone["text"]
    assert find(By.ID, "pg-base").is_displayed()

    # The per-token view of the steered answer: the CLI's tokens, numbers and summary.
    tokens = driver.find_elements(By.CSS_SELECTOR, "#pg-view .pv-tok")
    steps = steered["steps"]
    assert len(tokens) == len(steps)
    assert driver.execute_script(
        "return Array.from(document.querySelectorAll('#pg-view .pv-tok'))"
        ".map(function (t) { return t.textContent.replace(/\\u21b5/g, ''); }).join('')"
    ) == "".join(step["text"] for step in steps)
    summary = find(By.CSS_SELECTOR, "#pg-view [data-role=summary]").text
    assert summary == view.summary_line(view.from_generation(steered))
    target = min(2, len(tokens) - 1)
    ActionChains(driver).move_to_element(tokens[target]).perform()
    assert details(driver)["heading"].startswith(f"Token {target + 1} of {len(steps)}")
    assert_panel_shows(driver, steps[target])
    shot = screenshot(driver, tmp_path, "playground")

    # Without a mouse: focus the first token, then the arrow keys move along the text.
    tokens[0].click()
    driver.switch_to.active_element.send_keys(Keys.ARROW_RIGHT)
    active = driver.switch_to.active_element
    assert active.get_attribute("data-i") == "1"
    assert details(driver)["heading"].startswith(f"Token 2 of {len(steps)}")
    assert_panel_shows(driver, steps[1])

    # The key stays in this tab: sessionStorage only, no cookie, nothing in localStorage.
    assert driver.execute_script("return sessionStorage.getItem('proxyclient-playground-key')")
    assert driver.execute_script("return localStorage.length") == 0
    assert driver.get_cookies() == []

    driver.set_window_size(420, 900)
    assert fits_the_window(driver)
    screenshot(driver, tmp_path, "playground-narrow")
    assert shot.stat().st_size > 10_000
    assert all("401" in error for error in errors_in_console(driver))  # the deliberate one only


def test_saved_html_page_draws_the_trace_and_answers_the_keyboard(
    driver, base, tiny_models, tmp_path, capsys
):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    run = generate(base, tiny_models, tmp_path, capsys, ALPHA, "saved")
    steps = run["result"]["steps"]
    driver.set_window_size(1280, 900)
    driver.get(run["page"].as_uri())
    assert errors_in_console(driver) == []
    tokens = driver.find_elements(By.CSS_SELECTOR, ".pv-tok")
    assert len(tokens) == len(steps)
    data = view.from_generation(run["result"])
    summary = driver.find_element(By.CSS_SELECTOR, "[data-role=summary]").text
    assert summary == view.summary_line(data)
    for token, record in zip(tokens, data["tokens"], strict=True):
        flag = view.changed(record)
        want = "unknown" if flag is None else str(flag).lower()
        assert token.get_attribute("data-changed") == want
        moved, shift = view.shift(record), token.get_attribute("data-shift")
        if moved is None:
            assert shift == "outside"
        else:
            assert float(shift) == pytest.approx(moved, abs=1e-3)

    last = len(steps) - 1
    ActionChains(driver).move_to_element(tokens[last]).perform()
    assert_panel_shows(driver, steps[last])
    alternatives = driver.find_elements(By.CSS_SELECTOR, "[data-role=details] tbody tr")
    assert len(alternatives) == len(steps[last]["top"])
    screenshot(driver, tmp_path, "html-view")

    # Tab reaches the text in a few steps (the prompt's disclosure first); Home and End move.
    body = driver.find_element(By.TAG_NAME, "body")
    body.send_keys(Keys.TAB)
    for _ in range(4):
        if driver.switch_to.active_element.get_attribute("data-i") is not None:
            break
        driver.switch_to.active_element.send_keys(Keys.TAB)
    assert driver.switch_to.active_element.get_attribute("data-i") == "0"
    assert_panel_shows(driver, steps[0])
    driver.switch_to.active_element.send_keys(Keys.END)
    assert driver.switch_to.active_element.get_attribute("data-i") == str(last)
    assert_panel_shows(driver, steps[last])

    driver.set_window_size(420, 900)
    assert fits_the_window(driver)
    assert driver.find_element(By.CSS_SELECTOR, "[data-role=details]").is_displayed()
    screenshot(driver, tmp_path, "html-view-narrow")


def test_playground_chat_mode_streams_the_cli_messages_text(
    driver, served, base, tiny_models, tmp_path, capsys
):
    from selenium.webdriver.common.by import By

    messages = tmp_path / "messages.json"
    messages.write_text(json.dumps([{"role": "user", "content": PROMPT}]))
    expected = generate(
        base, tiny_models, tmp_path, capsys, ALPHA, "chat", "--messages", str(messages)
    )["result"]
    driver.set_window_size(1280, 900)
    driver.get(served.url + "/")  # the same tab: the key is still in its sessionStorage
    find = driver.find_element
    assert find(By.ID, "pg-key").get_attribute("value") == CLIENT_KEY
    find(By.CSS_SELECTOR, "input[name=mode][value=chat]").click()
    assert find(By.ID, "pg-prompt-label").text == "Messages"
    for element_id, value in (("pg-prompt", PROMPT), ("pg-alpha", ALPHA), ("pg-k", K),
                              ("pg-temperature", 0), ("pg-max-tokens", TOKENS)):  # fmt: skip
        field = find(By.ID, element_id)
        field.clear()
        field.send_keys(str(value))
    find(By.ID, "pg-generate").click()
    assert wait_for_state(driver) == "done", find(By.ID, "pg-status").text
    text = driver.execute_script("return document.getElementById('pg-steered-text').textContent")
    assert text == expected["text"]
    assert not find(By.ID, "pg-base").is_displayed()  # not asked for
    tokens = driver.find_elements(By.CSS_SELECTOR, "#pg-view .pv-tok")
    assert len(tokens) == len(expected["steps"])
    tokens[-1].click()
    assert_panel_shows(driver, expected["steps"][-1])
    screenshot(driver, tmp_path, "playground-chat")
