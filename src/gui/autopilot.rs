//! The unattended start the real-window test and the window benchmark use (`--generate`,
//! `--screenshot`, `--exit-after-screenshot`): generate once the model and the image are ready,
//! then a screenshot once the result (or a message) shows, then optionally close. A small state
//! machine that looks at what the editor reports and says what to do next; it never touches the
//! editor itself.

use std::path::PathBuf;

/// What is left to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    /// Waiting for the model and the image, then generate.
    Generate,
    /// Waiting for a result (or the image) before the screenshot.
    AwaitShot,
    /// Screenshot requested, waiting for it to be written.
    ShotRequested,
    Done,
}

/// The editor as the autopilot needs to see it.
#[derive(Debug, Clone, Copy)]
pub struct EditorReadiness {
    pub has_input: bool,
    pub model_loaded: bool,
    pub model_loading: bool,
    pub editing: bool,
    pub has_notices: bool,
}

/// What the editor should do now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AutopilotStep {
    Generate,
    /// Take a screenshot and write it here.
    Screenshot(PathBuf),
}

/// The unattended start and how far it got.
#[derive(Debug, Clone)]
pub struct Autopilot {
    stage: Stage,
    screenshot: Option<PathBuf>,
    exit_after_screenshot: bool,
}

impl Autopilot {
    /// Generate first when asked, else only the screenshot when one is asked for, else nothing.
    pub fn new(generate: bool, screenshot: Option<PathBuf>, exit_after_screenshot: bool) -> Self {
        let stage = if generate {
            Stage::Generate
        } else if screenshot.is_some() {
            Stage::AwaitShot
        } else {
            Stage::Done
        };
        Self {
            stage,
            screenshot,
            exit_after_screenshot,
        }
    }

    /// The next thing to do, once per frame.
    pub fn next(&mut self, editor: EditorReadiness) -> Option<AutopilotStep> {
        match self.stage {
            Stage::Generate => {
                if editor.has_input && editor.model_loaded && !editor.model_loading {
                    self.stage = Stage::AwaitShot;
                    return Some(AutopilotStep::Generate);
                }
            }
            Stage::AwaitShot => {
                let has_something = editor.has_input || editor.has_notices;
                if !editor.editing && has_something && !editor.model_loading {
                    match self.screenshot.clone() {
                        Some(path) => {
                            self.stage = Stage::ShotRequested;
                            return Some(AutopilotStep::Screenshot(path));
                        }
                        None => self.stage = Stage::Done,
                    }
                }
            }
            Stage::ShotRequested | Stage::Done => {}
        }
        None
    }

    /// Something failed (a model load, opening the image): stop waiting to generate and take the
    /// screenshot of the message instead.
    pub fn stop_waiting_to_generate(&mut self) {
        if self.stage == Stage::Generate {
            self.stage = Stage::AwaitShot;
        }
    }

    /// The screenshot is on disk. Returns whether the window should close now.
    pub fn screenshot_written(&mut self) -> bool {
        self.stage = Stage::Done;
        self.exit_after_screenshot
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn editor(has_input: bool, model_loaded: bool, editing: bool) -> EditorReadiness {
        EditorReadiness {
            has_input,
            model_loaded,
            model_loading: false,
            editing,
            has_notices: false,
        }
    }

    #[test]
    fn generates_when_ready_then_shoots_after_the_result() {
        let shot = PathBuf::from("shot.png");
        let mut autopilot = Autopilot::new(true, Some(shot.clone()), true);
        assert_eq!(autopilot.next(editor(true, false, false)), None);
        assert_eq!(
            autopilot.next(editor(true, true, false)),
            Some(AutopilotStep::Generate)
        );
        assert_eq!(autopilot.next(editor(true, true, true)), None);
        assert_eq!(
            autopilot.next(editor(true, true, false)),
            Some(AutopilotStep::Screenshot(shot))
        );
        assert_eq!(autopilot.next(editor(true, true, false)), None);
        assert!(autopilot.screenshot_written());
    }

    #[test]
    fn a_failure_skips_the_edit_and_nothing_asked_does_nothing() {
        let mut autopilot = Autopilot::new(true, Some(PathBuf::from("s.png")), false);
        autopilot.stop_waiting_to_generate();
        let message_only = EditorReadiness {
            has_notices: true,
            ..editor(false, false, false)
        };
        assert!(matches!(
            autopilot.next(message_only),
            Some(AutopilotStep::Screenshot(_))
        ));
        assert!(!autopilot.screenshot_written());

        let mut idle = Autopilot::new(false, None, false);
        assert_eq!(idle.next(editor(true, true, false)), None);
    }
}
