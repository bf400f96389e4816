"""The HTML template of the run report (jinja2, rendered by `server.report` with autoescape on).

Kept as a Python string, not an .html file, so that it travels inside the Flower App
bundle (FABs carry *.py/*.toml/*.md/*.json only) and the ServerApp can write the report.
"""

TEMPLATE = """<!DOCTYPE html>
{# fedpriv run report (server/report.py renders it with autoescape on).
   Every number comes from summary.json and carries data-key (and data-node in node rows)
   plus its exact JSON value in data-value, so tests and scripts can read the page back. #}
<html lang="en">
<head>
<meta charset="utf-8">
<title>fedpriv run {{ s.run_name }}</title>
<style>
  body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em auto; max-width: 1100px;
         padding: 0 1em; color: #222; line-height: 1.45; }
  h1 { font-size: 1.6em; margin-bottom: 0.2em; }
  h2 { font-size: 1.2em; margin-top: 1.8em; border-bottom: 1px solid #ddd; padding-bottom: 0.2em; }
  .sub { color: #555; margin-top: 0; }
  .cards { display: flex; flex-wrap: wrap; gap: 0.8em; margin: 1em 0; }
  .card { border: 1px solid #ddd; border-radius: 6px; padding: 0.5em 0.9em; min-width: 9em; }
  .card .label { font-size: 0.8em; color: #666; }
  .card .value { font-size: 1.4em; font-weight: 600; }
  table { border-collapse: collapse; margin: 0.6em 0; font-size: 0.92em; }
  th, td { border: 1px solid #ddd; padding: 0.25em 0.6em; text-align: left; vertical-align: top; }
  th { background: #f4f4f4; }
  td.num { text-align: right; font-variant-numeric: tabular-nums; }
  .threat { background: #f7f7fb; border-left: 4px solid #0072B2; padding: 0.6em 1em; }
  img.plot { max-width: 100%; height: auto; display: block; margin: 0.5em 0; }
  .warn { color: #a33; }
  details summary { cursor: pointer; }
</style>
</head>
<body>
<h1>fedpriv run <code id="run-name" data-key="run_name" data-value="{{ s.run_name | exact }}">{{ s.run_name }}</code></h1>
<p class="sub">{{ s.task }} task on <b>{{ s.dataset }}</b>, model {{ s.model }};
  <span data-key="rounds_completed" data-value="{{ s.rounds_completed | exact }}">{{ s.rounds_completed }}</span>
  of <span data-key="rounds_planned" data-value="{{ s.rounds_planned | exact }}">{{ s.rounds_planned }}</span> rounds completed,
  <span data-key="rounds_aggregated" data-value="{{ s.rounds_aggregated | exact }}">{{ s.rounds_aggregated }}</span> of them changed the model{% if s.get('resumed_after_round') is not none %} (resumed after round {{ s.resumed_after_round }}){% endif %}.</p>

<div class="cards">
  <div class="card"><div class="label">final test accuracy</div>
    <div class="value" id="final-test-accuracy" data-key="final.test_accuracy" data-value="{{ final.test_accuracy | exact }}">{{ final.test_accuracy | fmt('.4f') }}</div></div>
  {% if final.test_balanced_accuracy is defined %}
  <div class="card"><div class="label">final test balanced accuracy</div>
    <div class="value" id="final-test-balanced-accuracy" data-key="final.test_balanced_accuracy" data-value="{{ final.test_balanced_accuracy | exact }}">{{ final.test_balanced_accuracy | fmt('.4f') }}</div></div>
  {% endif %}
  {% if final.test_auc is defined %}
  <div class="card"><div class="label">final test AUC</div>
    <div class="value" id="final-test-auc" data-key="final.test_auc" data-value="{{ final.test_auc | exact }}">{{ final.test_auc | fmt('.4f') }}</div></div>
  {% endif %}
  <div class="card"><div class="label">final test loss</div>
    <div class="value" id="final-test-loss" data-key="final.test_loss" data-value="{{ final.test_loss | exact }}">{{ final.test_loss | fmt('.4f') }}</div></div>
  <div class="card"><div class="label">majority class</div>
    <div class="value" id="majority-class-rate" data-key="majority_class_rate" data-value="{{ s.majority_class_rate | exact }}">{{ s.majority_class_rate | fmt('.4f') }}</div></div>
  <div class="card"><div class="label">largest node epsilon</div>
    <div class="value" id="max-client-epsilon" data-key="max_client_epsilon" data-value="{{ s.get('max_client_epsilon') | exact }}">{{ s.get('max_client_epsilon') | fmt('.3f') }}</div></div>
  <div class="card"><div class="label">client-level epsilon</div>
    {% if client_level_on %}
    <div class="value" id="client-level-epsilon" data-key="client_level.epsilon" data-value="{{ client_level.epsilon | exact }}">{{ client_level.epsilon | fmt('.4g') }}</div>
    {% else %}
    <div class="value" id="client-level-epsilon" data-key="client_level.epsilon" data-value="null">off</div>
    {% endif %}</div>
</div>

<h2>Threat model</h2>
<p class="threat" id="threat-model">{{ threat_model }}</p>

<h2>Privacy</h2>
<ul id="privacy-settings">
  <li>Differential privacy: {% if s.dp %}DP-SGD per node (sample-level), target epsilon
    <span data-key="target_epsilon" data-value="{{ s.target_epsilon | exact }}">{{ s.target_epsilon | fmt('g') }}</span> in this run at delta
    <span data-key="delta" data-value="{{ s.delta | exact }}">{{ s.delta | fmt('g') }}</span>.{% else %}<b class="warn">off</b>.{% endif %}</li>
  <li>Secure aggregation: {% if s.secure_aggregation %}SecAgg+ (the server saw only sums of updates){% else %}<b class="warn">off</b> (the server saw each node's update){% endif %}.</li>
  <li id="client-level">Client-level DP:
    {% if client_level_on %}epsilon <span data-key="client_level.epsilon" data-value="{{ client_level.epsilon | exact }}">{{ client_level.epsilon | fmt('.4g') }}</span>
      at delta <span data-key="client_level.delta" data-value="{{ client_level.delta | exact }}">{{ client_level.delta | fmt('g') }}</span>
      (noise multiplier <span data-key="client_level.noise_multiplier" data-value="{{ client_level.noise_multiplier | exact }}">{{ client_level.noise_multiplier | fmt('g') }}</span>,
      <span data-key="client_level.rounds" data-value="{{ client_level.rounds | exact }}">{{ client_level.rounds }}</span> released rounds): what the released model reveals about any one node's whole dataset,
      {{ client_level.get('assumption', 'against an honest-but-curious server') }}.
    {% elif s.secure_aggregation %}off: no client-level noise was added, so only each node's sample-level epsilon protects its data.
    {% else %}not applicable (needs secure aggregation).{% endif %}</li>
</ul>

<table id="nodes">
  <thead><tr><th>node</th><th>epsilon</th><th>per (privacy unit)</th><th>delta</th><th>budget (max epsilon)</th><th>records</th>
    <th>rounds trained</th><th>declined rounds</th><th>refused rounds</th><th>failed rounds</th></tr></thead>
  <tbody>
  {% for name, c in s.clients.items() %}
  <tr data-node="{{ name }}">
    <td>{{ name }}</td>
    <td class="num" data-key="epsilon" data-value="{{ c.epsilon | exact }}">{{ c.epsilon | fmt('.3f') }}</td>
    <td data-key="privacy_unit" data-value="{{ c.get('privacy_unit') | exact }}">{{ c.get('privacy_unit') or '-' }}</td>
    <td class="num" data-key="delta" data-value="{{ c.delta | exact }}">{{ c.delta | fmt('g') }}</td>
    <td class="num" data-key="max_epsilon" data-value="{{ c.max_epsilon | exact }}">{{ c.max_epsilon | fmt('g') }}</td>
    <td class="num">{{ c.num_examples if c.num_examples is defined else '-' }}{% if c.get('num_groups') %} ({{ c.num_groups }} groups){% endif %}</td>
    <td class="num">{{ c.rounds_trained | length }}</td>
    <td data-key="declined_rounds" data-value="{{ c.declined_rounds | exact }}">{{ c.declined_rounds | join(', ') or '-' }}</td>
    <td data-key="refused_rounds" data-value="{{ c.get('refused_rounds', []) | exact }}">{{ c.get('refused_rounds', []) | join(', ') or '-' }}</td>
    <td data-key="failed_rounds" data-value="{{ c.failed_rounds | exact }}">{{ c.failed_rounds | join(', ') or '-' }}</td>
  </tr>
  {% endfor %}
  </tbody>
</table>
{% if s.get('refusals') %}
<ul id="refusals">
  {% for r in s.refusals %}
  <li data-refusal="{{ loop.index0 }}">round {{ r.round }}: {{ r.node }} refused: {{ r.reason }}</li>
  {% endfor %}
</ul>
{% endif %}

<img class="plot" id="plot-epsilon" data-plot="{{ plot_files.epsilon }}" alt="each node's epsilon by round against its budget" src="{{ plots.epsilon }}">
<p class="sub">Each line is one node's cumulative epsilon as the node reported it after each round (ledger.json);
  nodes that spent the same overlap. A round that would take a node past its budget (dashed) is declined.</p>

<h3>What each node sent, and what protects it</h3>
<table id="releases">
  <thead><tr><th>field</th><th>sent</th><th>protected by</th></tr></thead>
  <tbody>
  {% for r in releases %}
  <tr><td>{{ r.field }}</td><td>{{ r.sent }}</td><td>{{ r.protection }}</td></tr>
  {% endfor %}
  </tbody>
</table>

<h2>Model quality</h2>
<p id="released-model">The released model (<code>final_model.pt</code>; <code>final_model.pt2</code> loads with torch alone,
  <code>fedpriv predict</code> applies it to local data)
  {% set optimizer = (s.get('server_optimizer') or {}).get('name', 'fedavg') %}
  {% if s.get('released_model') == 'ema' %}is the moving average (EMA, decay
  <span data-key="ema_decay" data-value="{{ s.ema_decay | exact }}">{{ s.ema_decay }}</span>) of the global model over the
  aggregated rounds, and the test metrics are the average's; computed from the released aggregates alone
  {% if optimizer != 'fedavg' %}(as is the server optimiser's step,
  <span data-key="server_optimizer.name" data-value="{{ optimizer | exact }}">{{ optimizer }}</span>){% endif %}, it
  {% elif optimizer != 'fedavg' %}was moved by the server optimiser
  <span data-key="server_optimizer.name" data-value="{{ optimizer | exact }}">{{ optimizer }}</span> from the released
  aggregates alone and
  {% endif %}
  {% if s.dp %}carries each node's sample-level epsilon above: at most
  <span data-key="max_client_epsilon" data-value="{{ s.max_client_epsilon | exact }}">{{ s.max_client_epsilon | fmt('.3f') }}</span>
  at delta {{ s.delta }} for any node's records{% if client_level_on %}, and client-level epsilon
  {{ client_level.epsilon | fmt('.3f') }} for a whole node's data{% endif %}.
  {% else %}was trained without differential privacy: nothing bounds what it reveals about a record.{% endif %}</p>
<img class="plot" id="plot-accuracy" data-plot="{{ plot_files.accuracy }}" alt="global test accuracy and loss by round" src="{{ plots.accuracy }}">
<img class="plot" id="plot-classes" data-plot="{{ plot_files.classes }}" alt="confusion matrix (and ROC curve) of the final model" src="{{ plots.classes }}">
{% if final.get('per_class') %}
<table id="per-class">
  <thead><tr><th>class</th><th>precision</th><th>recall</th><th>F1</th><th>test records</th></tr></thead>
  <tbody>
  {% for name in final.per_class.classes %}
  <tr data-class="{{ name }}"><td>{{ name }}</td><td>{{ final.per_class.precision[loop.index0] | fmt('.3f') }}</td>
    <td>{{ final.per_class.recall[loop.index0] | fmt('.3f') }}</td><td>{{ final.per_class.f1[loop.index0] | fmt('.3f') }}</td>
    <td>{{ final.per_class.support[loop.index0] }}</td></tr>
  {% endfor %}
  </tbody>
</table>
{% if final.get('roc') %}<p class="sub">Binary task: the model answers {{ final.per_class.classes[1] }} when its probability is above
  {{ final.roc.threshold_used }}; the ROC curve shows what other thresholds would trade.</p>{% endif %}
{% endif %}

<h2>Declined rounds and failures</h2>
<img class="plot" id="plot-participation" data-plot="{{ plot_files.participation }}" alt="what each node did in each round" src="{{ plots.participation }}">
<p class="sub">A node that never replied before it failed is named by its Flower node id.</p>
<p>Rounds that did not change the model:
  <span id="unaggregated-rounds">{{ unaggregated | join(', ') or 'none' }}</span>.
  {% if s.secure_aggregation %}Rounds whose secure aggregation failed:
  <span data-key="secure_rounds_failed" data-value="{{ s.get('secure_rounds_failed', []) | exact }}">{{ s.get('secure_rounds_failed', []) | join(', ') or 'none' }}</span>.{% endif %}</p>
{% if s.failures %}
<table id="failures">
  <thead><tr><th>round</th><th>node</th><th>error</th></tr></thead>
  <tbody>
  {% for f in s.failures %}
  <tr data-failure="{{ loop.index0 }}"><td class="num">{{ f.round }}</td><td>{{ f.node }}</td><td>{{ f.error }}</td></tr>
  {% endfor %}
  </tbody>
</table>
{% else %}
<p id="failures">No node failed.</p>
{% endif %}

<h2>Configuration</h2>
<details id="configuration" open>
<summary>config.json (the resolved run-config{% if run_kind == "deployed" %}; a deployed run: the simulation-only keys are left out, each site's budget, validation share and ledger are its own{% endif %})</summary>
<table>
  <tbody>
  {% for key, value in config.items() %}
  <tr data-config="{{ key }}"><th>{{ key }}</th><td>{{ config_json[key] }}</td></tr>
  {% endfor %}
  </tbody>
</table>
</details>
<p class="sub">Written by <code>fedpriv report</code> from summary.json, metrics.jsonl, ledger.json and config.json;
  run took {{ s.get('seconds') | fmt('.0f') }} s.</p>
</body>
</html>
"""
