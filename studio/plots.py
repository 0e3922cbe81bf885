"""Plotly figures of a RunView: loss (raw and smoothed), the layers x steps rank heatmap and chosen layer lines."""
from __future__ import annotations

import plotly.graph_objects as go

from studio.runview import RunView

LAYOUT = dict(margin=dict(l=50, r=20, t=40, b=40), template="plotly_white")


def short_name(layer: str) -> str:
    """down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k -> d1.a0.t0.attn2.to_k"""
    for long, short in (("down_blocks.", "d"), ("up_blocks.", "u"), ("mid_block.", "m."), ("attentions.", "a"),
                        ("transformer_blocks.", "t"), ("resnets.", "r")):
        layer = layer.replace(long, short)
    return layer


def _empty(title: str, note: str) -> go.Figure:
    fig = go.Figure()
    fig.update_layout(title=title, height=300, annotations=[dict(text=note, showarrow=False, x=0.5, y=0.5,
                                                                 xref="paper", yref="paper")], **LAYOUT)
    return fig


def _restarts(fig: go.Figure, view: RunView) -> None:
    for i, step in enumerate(view.restarts):
        label = {"annotation_text": "restart", "annotation_position": "top"} if i == 0 else {}
        fig.add_vline(x=step, line_dash="dash", line_color="crimson", line_width=2, **label)


def loss_figure(view: RunView | None) -> go.Figure:
    title = "Training loss"
    if view is None or not view.steps:
        return _empty(title, "no steps yet")
    fig = go.Figure()
    fig.add_trace(go.Scatter(x=view.steps, y=view.losses, mode="lines", name="raw", opacity=0.35,
                             line=dict(color="#7f7f7f", width=1)))
    fig.add_trace(go.Scatter(x=view.steps, y=view.smoothed, mode="lines", name="smoothed (EMA 0.9)",
                             line=dict(color="#1f77b4", width=2.5)))
    _restarts(fig, view)
    fig.update_layout(title=f"{title} · {view.name}", xaxis_title="step", yaxis_title="loss", height=320,
                      legend=dict(orientation="h", y=1.12, x=1, xanchor="right"), **LAYOUT)
    return fig


def rank_heatmap(view: RunView | None) -> go.Figure:
    title = "Effective rank per layer (tau energy) over steps"
    if view is None or not view.rank_steps:
        return _empty(title, "no rank snapshot yet")
    fig = go.Figure(go.Heatmap(z=view.effective, x=view.rank_steps, y=[short_name(n) for n in view.layers],
                               colorscale="Viridis", colorbar=dict(title="rank"),
                               hovertemplate="step %{x}<br>%{y}<br>rank %{z}<extra></extra>"))
    _restarts(fig, view)
    fig.update_layout(title=title + (" · dashed: AC-LoRA restarts" if view.restarts else ""), xaxis_title="step",
                      height=max(320, 60 + 11 * len(view.layers)), yaxis=dict(tickfont=dict(size=9)), **LAYOUT)
    return fig


def rank_lines(view: RunView | None, layers: list[str] | None) -> go.Figure:
    title = "Ranks of chosen layers (solid: effective, dotted: native)"
    if view is None or not view.rank_steps:
        return _empty(title, "no rank snapshot yet")
    chosen = [n for n in (layers or view.layers[:3]) if n in view.layers]
    fig = go.Figure()
    for n in chosen:
        i = view.layers.index(n)
        fig.add_trace(go.Scatter(x=view.rank_steps, y=view.effective[i], mode="lines+markers", name=short_name(n)))
        fig.add_trace(go.Scatter(x=view.rank_steps, y=view.native[i], mode="lines", name=f"{short_name(n)} native",
                                 line=dict(dash="dot"), showlegend=False))
    _restarts(fig, view)
    fig.update_layout(title=title, xaxis_title="step", yaxis_title="rank", height=320, **LAYOUT)
    return fig


def prune_figure(layers: list[str], before: dict[str, int], after: dict[str, int]) -> go.Figure:
    names = [short_name(n.removeprefix("lora_unet_")) for n in layers]
    fig = go.Figure()
    fig.add_trace(go.Bar(x=names, y=[before[n] for n in layers], name="before", marker_color="#c7c7c7"))
    fig.add_trace(go.Bar(x=names, y=[after[n] for n in layers], name="after", marker_color="#1f77b4"))
    fig.update_layout(title="Per-layer rank before / after pruning", barmode="overlay", height=340,
                      xaxis=dict(tickfont=dict(size=8), tickangle=-60), yaxis_title="rank",
                      legend=dict(orientation="h", y=1.12, x=1, xanchor="right"), **LAYOUT)
    return fig
