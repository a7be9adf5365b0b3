"""seesay.viz: seeing what a captioner does (matplotlib on the Agg backend, imported lazily).

- `seesay.viz.attention`: attention figures (image + one heat-map panel per word).
- `seesay.viz.visualize`: `visualize_image` (`seesay visualize`) and `save_attention_maps`
  (`seesay caption --attention-map`).
- `seesay.viz.curves`: training curves from RUN_DIR/metrics.jsonl (`seesay plot`).
- `seesay.viz.report`: the self-contained HTML report (`seesay report`).
"""
