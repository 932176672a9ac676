//! The image view: the current image fitted into the space, with zoom (scroll or pinch, around the
//! pointer), pan (drag) and a before/after comparison, either as a split line dragged over the
//! image or as a toggle.

use egui::{Color32, Pos2, Rect, Sense, Stroke, TextureId, Vec2, pos2, vec2};

/// How the before/after pair is shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CompareMode {
    /// Only the result (or the input when there is no result).
    #[default]
    After,
    /// Only the input.
    Before,
    /// Input on the left of the split line, result on the right.
    Split,
}

/// Zoom, pan and split position; kept across frames.
#[derive(Debug, Clone, PartialEq)]
pub struct ViewerState {
    /// 1 = fitted into the view.
    pub zoom: f32,
    /// Offset of the image centre from the view centre, in points.
    pub pan: Vec2,
    /// Where the split line sits, 0 (left edge) to 1 (right edge) of the image.
    pub split: f32,
    pub mode: CompareMode,
}

impl Default for ViewerState {
    fn default() -> Self {
        Self {
            zoom: 1.0,
            pan: Vec2::ZERO,
            split: 0.5,
            mode: CompareMode::After,
        }
    }
}

impl ViewerState {
    pub const MIN_ZOOM: f32 = 0.1;
    pub const MAX_ZOOM: f32 = 32.0;

    /// Back to fitted and centred.
    pub fn reset_view(&mut self) {
        self.zoom = 1.0;
        self.pan = Vec2::ZERO;
    }

    /// Where an image of `size` pixels is drawn inside `view`.
    pub fn image_rect(&self, view: Rect, size: Vec2) -> Rect {
        let fit = (view.width() / size.x).min(view.height() / size.y).max(0.0);
        let shown = size * fit * self.zoom;
        Rect::from_center_size(view.center() + self.pan, shown)
    }

    /// Zooms by `factor` keeping the image point under `anchor` where it is.
    pub fn zoom_around(&mut self, view: Rect, anchor: Pos2, factor: f32) {
        let new_zoom = (self.zoom * factor).clamp(Self::MIN_ZOOM, Self::MAX_ZOOM);
        let applied = new_zoom / self.zoom;
        let centre = view.center() + self.pan;
        let new_centre = anchor + (centre - anchor) * applied;
        self.pan = new_centre - view.center();
        self.zoom = new_zoom;
    }
}

/// One texture and its pixel size.
#[derive(Debug, Clone, Copy)]
pub struct Shown {
    pub texture: TextureId,
    pub size: Vec2,
}

/// Draws `after` (and `before`, by the state's mode) filling the available space and handles
/// zoom, pan and the split line. `label` names the view for screen readers and tests.
pub fn show(
    ui: &mut egui::Ui,
    state: &mut ViewerState,
    before: Option<Shown>,
    after: Option<Shown>,
    label: &str,
) -> egui::Response {
    let available = ui.available_size().max(vec2(64.0, 64.0));
    let (view, response) = ui.allocate_exact_size(available, Sense::click_and_drag());
    response.widget_info(|| egui::WidgetInfo::labeled(egui::Role::Image, true, label));
    let painter = ui.painter_at(view);
    painter.rect_filled(view, 0.0, ui.visuals().extreme_bg_color);

    let Some(main) = after.or(before) else {
        return response;
    };
    let image_rect = state.image_rect(view, main.size);

    // Zoom with the wheel / pinch around the pointer; double-click resets.
    if let Some(pointer) = response.hover_pos() {
        let (scroll, pinch) = ui.input(|i| (i.smooth_scroll_delta.y, i.zoom_delta()));
        let factor = pinch * (scroll / 200.0).exp();
        if (factor - 1.0).abs() > 1e-4 {
            state.zoom_around(view, pointer, factor);
        }
    }
    if response.double_clicked() {
        state.reset_view();
    }

    let split_mode = state.mode == CompareMode::Split && before.is_some() && after.is_some();
    let split_x = image_rect.left() + image_rect.width() * state.split;
    let near_split = |pos: Pos2| split_mode && (pos.x - split_x).abs() < 8.0;
    if response.drag_started() {
        // Where the button went down, not where the pointer is once the drag is recognised.
        let grabbed = ui
            .input(|i| i.pointer.press_origin())
            .is_some_and(near_split);
        ui.memory_mut(|m| m.data.insert_temp(response.id, grabbed));
    }
    // Whether this drag began on the split line (remembered from its first frame).
    let dragging_split =
        response.dragged() && ui.memory(|m| m.data.get_temp::<bool>(response.id).unwrap_or(false));
    if response.dragged() {
        if dragging_split {
            if let Some(pos) = response.interact_pointer_pos() {
                state.split = ((pos.x - image_rect.left()) / image_rect.width()).clamp(0.0, 1.0);
            }
        } else {
            state.pan += response.drag_delta();
        }
    }
    if response.hover_pos().is_some_and(near_split) || dragging_split {
        ui.ctx().set_cursor_icon(egui::CursorIcon::ResizeHorizontal);
    }

    let image_rect = state.image_rect(view, main.size);
    let full_uv = Rect::from_min_max(pos2(0.0, 0.0), pos2(1.0, 1.0));
    match (state.mode, before, after) {
        (CompareMode::Split, Some(before), Some(after)) => {
            let split_x = image_rect.left() + image_rect.width() * state.split;
            let left = Rect::from_min_max(image_rect.min, pos2(split_x, image_rect.max.y));
            let right = Rect::from_min_max(pos2(split_x, image_rect.min.y), image_rect.max);
            let left_uv = Rect::from_min_max(pos2(0.0, 0.0), pos2(state.split, 1.0));
            let right_uv = Rect::from_min_max(pos2(state.split, 0.0), pos2(1.0, 1.0));
            painter.image(before.texture, left, left_uv, Color32::WHITE);
            painter.image(after.texture, right, right_uv, Color32::WHITE);
            let line = Stroke::new(2.0, Color32::WHITE);
            painter.vline(split_x, image_rect.y_range(), line);
            painter.circle(
                pos2(split_x, image_rect.center().y),
                7.0,
                Color32::from_black_alpha(160),
                line,
            );
            let font = egui::FontId::proportional(13.0);
            let tag = |pos: Pos2, align: egui::Align2, text: &str| {
                painter.text(pos, align, text, font.clone(), Color32::WHITE);
            };
            tag(
                left.left_top() + vec2(6.0, 4.0),
                egui::Align2::LEFT_TOP,
                "before",
            );
            tag(
                right.right_top() + vec2(-6.0, 4.0),
                egui::Align2::RIGHT_TOP,
                "after",
            );
        }
        (CompareMode::Before, Some(before), _) => {
            painter.image(before.texture, image_rect, full_uv, Color32::WHITE);
        }
        _ => {
            painter.image(main.texture, image_rect, full_uv, Color32::WHITE);
        }
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fit_and_zoom_keep_the_anchor_still() {
        let view = Rect::from_min_size(pos2(0.0, 0.0), vec2(400.0, 300.0));
        let mut state = ViewerState::default();
        // 800×400 fitted into 400×300: scale 0.5, 400×200 centred.
        let rect = state.image_rect(view, vec2(800.0, 400.0));
        assert_eq!(
            rect,
            Rect::from_min_size(pos2(0.0, 50.0), vec2(400.0, 200.0))
        );

        let anchor = pos2(100.0, 100.0);
        let fraction = |r: Rect| (anchor - r.min) / r.size();
        let before = fraction(rect);
        state.zoom_around(view, anchor, 2.0);
        let zoomed = state.image_rect(view, vec2(800.0, 400.0));
        assert_eq!(zoomed.size(), vec2(800.0, 400.0));
        let after = fraction(zoomed);
        assert!((before - after).length() < 1e-5, "{before:?} vs {after:?}");

        state.zoom_around(view, anchor, 1e6);
        assert_eq!(state.zoom, ViewerState::MAX_ZOOM);
        state.reset_view();
        assert_eq!(state, ViewerState::default());
    }
}
