// Kiosk page logic: pick or photograph an image, ask, stream the answer (OpenAI chunk SSE), show the gate banner.
// A conversation: follow-up questions are about the same picture (the page keeps the history and sends it
// whole, the server is stateless); a new picture, "No picture" or "Start over" begins a new one; a flagged
// picture's banner stays for the whole conversation. No framework, no network but this server.
// Each turn is shown once: earlier turns in #history, the latest question and answer in #asked and #answer
// (the answer in large type); asking again moves that turn into the history. The page never scrolls (the
// question box and buttons stay in view, kiosk.css); the answer card scrolls to the newest text.
// State for tests and styling: body[data-state] = idle | busy | done | error; #history[data-turns] = the
// conversation's finished turns (the history's items plus the one shown below it).
"use strict";
(() => {
  const $ = (id) => document.getElementById(id);
  const MAX_SIDE = 1344;                       // larger pictures are scaled down here (the gate sees 336 px anyway)
  const SEND_AS_IS_BYTES = 3 * 1024 * 1024;    // small files of a common format go as they are
  const AS_IS_TYPES = ["image/jpeg", "image/png", "image/webp", "image/gif", "image/bmp"];
  const IDLE_RESET_S = Number(new URLSearchParams(location.search).get("idle") || 180);
  const KEY_NAME = "safeclip-api-key";
  let picture = null;                          // data: URI sent to the server
  let messages = [];                           // the conversation so far: user and assistant messages
  let flagged = null;                          // the banner's verdict, kept for the whole conversation
  let shown = null;                            // the finished turn in #asked/#answer: {question, answer}
  let controller = null;                       // AbortController of the request in flight
  let idleTimer = null;

  function setState(state) { document.body.dataset.state = state; }

  function headers() {
    const h = { "Content-Type": "application/json" };
    const key = localStorage.getItem(KEY_NAME);
    if (key) h.Authorization = "Bearer " + key;
    return h;
  }

  function readAsDataURL(blob) {
    return new Promise((resolve, reject) => {
      const r = new FileReader();
      r.onload = () => resolve(r.result);
      r.onerror = () => reject(r.error);
      r.readAsDataURL(blob);
    });
  }

  function loadImage(url) {
    return new Promise((resolve, reject) => {
      const img = new Image();
      img.onload = () => resolve(img);
      img.onerror = () => reject(new Error("unreadable"));
      img.src = url;
    });
  }

  // The picture as a data: URI: as it is when small, else scaled on a white background (what the gate
  // composites transparency onto) and sent as JPEG.
  async function pictureFrom(file) {
    const url = URL.createObjectURL(file);
    try {
      const img = await loadImage(url);
      const w = img.naturalWidth, h = img.naturalHeight;
      if (Math.max(w, h) <= MAX_SIDE && file.size <= SEND_AS_IS_BYTES && AS_IS_TYPES.includes(file.type)) {
        return await readAsDataURL(file);
      }
      const scale = Math.min(1, MAX_SIDE / Math.max(w, h));
      const canvas = document.createElement("canvas");
      canvas.width = Math.max(1, Math.round(w * scale));
      canvas.height = Math.max(1, Math.round(h * scale));
      const ctx = canvas.getContext("2d");
      ctx.fillStyle = "#ffffff";
      ctx.fillRect(0, 0, canvas.width, canvas.height);
      ctx.drawImage(img, 0, 0, canvas.width, canvas.height);
      return canvas.toDataURL("image/jpeg", 0.9);
    } finally {
      URL.revokeObjectURL(url);
    }
  }

  async function onPicked(ev) {
    const file = ev.target.files && ev.target.files[0];
    ev.target.value = "";
    if (!file) return;
    newConversation();
    try {
      picture = await pictureFrom(file);
    } catch (e) {
      picture = null;
      showError("This picture cannot be opened here. Please try a JPEG or PNG photo.");
      return;
    }
    $("preview").src = picture;
    $("preview").hidden = false;
    $("remove-picture").hidden = false;
    $("picture-note").textContent = "Picture ready.";
    $("question").focus();
  }

  function newConversation() {
    messages = [];
    flagged = null;
    shown = null;
    $("history").replaceChildren();
    $("history").dataset.turns = "0";
    $("banner").hidden = true;
    $("question").placeholder = "What is in this picture?";
    clearAnswer();
  }

  function speaker(who, text) {
    const b = document.createElement("strong");
    b.textContent = who + ": ";
    return [b, document.createTextNode(text)];
  }

  // The turn shown below the history joins it (when a follow-up is asked): it is then on the page once.
  function addTurn(question, answer) {
    for (const [who, text] of [["You", question], ["Assistant", answer]]) {
      const li = document.createElement("li");
      li.append(...speaker(who, text));
      $("history").appendChild(li);
    }
  }

  function scrollAnswer() {
    const card = $("answer-card");
    card.scrollTop = card.scrollHeight;
  }

  function removePicture() {
    newConversation();
    picture = null;
    $("preview").hidden = true;
    $("preview").removeAttribute("src");
    $("remove-picture").hidden = true;
    $("picture-note").textContent = "You can also ask a question without a picture.";
  }

  function clearAnswer() {
    $("asked").replaceChildren();
    $("asked").hidden = true;
    $("answer").textContent = "";
    $("answer").dataset.chunks = "0";
    delete $("answer").dataset.finish;
    $("status").textContent = "";
    $("error").hidden = true;
    $("error").textContent = "";
    setState("idle");
  }

  function showError(text) {
    $("error").textContent = text;
    $("error").hidden = false;
    setState("error");
  }

  function friendlyError(status, body, retryAfter) {
    const err = (body && body.error) || {};
    if (status === 503) {
      return "The assistant is busy right now. Please try again" + (retryAfter ? ` in ${retryAfter} seconds.` : " soon.");
    }
    if (status === 413) return "This picture is too large. Please choose a smaller one.";
    if (err.code === "invalid_image") return "This picture cannot be read. Please try a JPEG or PNG photo.";
    if (err.code === "context_length_exceeded") {
      return messages.length ? "This conversation is too long to go on. Please press Start over."
        : "The question is too long. Please make it shorter.";
    }
    return err.message ? "Sorry, that did not work: " + err.message : `Sorry, that did not work (error ${status}).`;
  }

  const ACTIONS = {
    refused: "For safety, the assistant will not describe it.",
    instructed: "The assistant will answer with care.",
    annotated: "The answer below comes with this note.",
  };

  // The banner: this turn's verdict, or a flagged picture earlier in the conversation (safeclip.images).
  function showVerdict(gate) {
    if (!gate) return;
    const earlier = (gate.images || []).find((im) => im.flagged);
    if (gate.flagged) flagged = { category: gate.category, action: gate.action };
    else if (earlier && !flagged) flagged = { category: earlier.category, action: gate.action };
    if (!flagged) return;
    gate = flagged;
    $("banner-category").textContent = String(gate.category || "sensitive content").replace(/_/g, " ");
    $("banner-action").textContent = ACTIONS[gate.action] || "";
    $("banner").dataset.category = gate.category || "";
    $("banner").dataset.action = gate.action || "";
    $("banner").hidden = false;
  }

  function appendText(text) {
    const a = $("answer");
    a.appendChild(document.createTextNode(text));
    a.dataset.chunks = String(Number(a.dataset.chunks) + 1);
    scrollAnswer();
  }

  // Server-sent events from a fetch body: "data: {...}\n\n" blocks, ended by "data: [DONE]".
  async function readEvents(body, onData) {
    const reader = body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      buffer += decoder.decode(value || new Uint8Array(), { stream: !done });
      let cut;
      while ((cut = buffer.search(/\r?\n\r?\n/)) >= 0) {
        const block = buffer.slice(0, cut);
        buffer = buffer.slice(cut).replace(/^\r?\n\r?\n/, "");
        const data = block.split(/\r?\n/).filter((l) => l.startsWith("data:"))
          .map((l) => l.slice(5).replace(/^ /, "")).join("\n");
        if (data === "[DONE]") return true;
        if (data) onData(JSON.parse(data));
      }
      if (done) return false;
    }
  }

  async function ask(ev) {
    ev.preventDefault();
    const question = $("question").value.trim();
    if (!question) { showError("Please type a question first."); return; }
    if (controller) return;
    if (shown) { addTurn(shown.question, shown.answer); shown = null; }
    clearAnswer();
    $("asked").append(...speaker("You", question));
    $("asked").hidden = false;
    setState("busy");
    $("status").textContent = picture ? "Looking at the picture…" : "Thinking…";
    $("ask-button").disabled = true;
    $("stop-button").hidden = false;
    const content = [{ type: "text", text: question }];
    if (picture && !messages.length) content.push({ type: "image_url", image_url: { url: picture } });
    const turn = { role: "user", content };
    controller = new AbortController();
    scrollAnswer();
    try {
      const resp = await fetch("/v1/chat/completions", {
        method: "POST", headers: headers(), signal: controller.signal,
        body: JSON.stringify({ messages: [...messages, turn], stream: true }),
      });
      if (resp.status === 401) {
        $("key-form").hidden = false;
        $("key-input").focus();
        showError("An access key is needed. Please enter it below.");
        return;
      }
      if (!resp.ok) {
        const body = await resp.json().catch(() => null);
        showError(friendlyError(resp.status, body, resp.headers.get("Retry-After")));
        return;
      }
      $("status").textContent = "";
      let failed = null;
      const complete = await readEvents(resp.body, (obj) => {
        if (obj.error) { failed = obj.error.message || "the answer stopped"; return; }
        if (obj.safeclip && obj.choices && obj.choices.length && obj.choices[0].delta.role) showVerdict(obj.safeclip);
        const choice = obj.choices && obj.choices[0];
        if (choice && choice.delta && choice.delta.content) appendText(choice.delta.content);
        if (choice && choice.finish_reason) $("answer").dataset.finish = choice.finish_reason;
      });
      if (failed || !complete) {
        showError("Sorry, the answer stopped early. Please try again.");
        return;
      }
      if (!$("answer").textContent) $("status").textContent = "(no answer)";
      messages.push(turn, { role: "assistant", content: $("answer").textContent });
      shown = { question, answer: $("answer").textContent };
      $("history").dataset.turns = String(messages.length / 2);
      $("question").placeholder = "Ask a follow-up question about the same picture";
      $("question").value = "";
      setState("done");
      scrollAnswer();
    } catch (e) {
      if (e.name === "AbortError") { $("status").textContent = "Stopped."; setState("done"); }
      else showError("The assistant cannot be reached. Please try again.");
    } finally {
      controller = null;
      $("ask-button").disabled = false;
      $("stop-button").hidden = true;
    }
  }

  function stop() { if (controller) controller.abort(); }

  function reset() {
    stop();
    removePicture();
    $("question").value = "";
  }

  function poke() {
    clearTimeout(idleTimer);
    if (IDLE_RESET_S > 0) idleTimer = setTimeout(() => { if (!controller) reset(); }, IDLE_RESET_S * 1000);
  }

  document.addEventListener("DOMContentLoaded", () => {
    $("camera-input").addEventListener("change", onPicked);
    $("file-input").addEventListener("change", onPicked);
    $("remove-picture").addEventListener("click", removePicture);
    $("ask-form").addEventListener("submit", ask);
    $("stop-button").addEventListener("click", stop);
    $("reset-button").addEventListener("click", reset);
    $("key-form").addEventListener("submit", (ev) => {
      ev.preventDefault();
      localStorage.setItem(KEY_NAME, $("key-input").value.trim());
      $("key-input").value = "";
      $("key-form").hidden = true;
      $("error").hidden = true;
      setState("idle");
    });
    for (const type of ["pointerdown", "keydown", "change"]) document.addEventListener(type, poke, { passive: true });
    poke();
  });
})();
