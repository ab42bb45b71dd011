-- Schema version 13: per-tag override layers of an app's environment
-- (issue 20). Each version now belongs to one layer: '' is the app's base
-- layer, anything else a tag as deploy selectors use it (`env:staging`,
-- or `role` for a label without a value) whose variables override the base
-- on the nodes carrying that tag. Versions stay one sequence per app
-- across its layers, so a version number names one change; a row's
-- `sealed` holds its layer's whole content after it (for a tag layer under
-- "<app>/<version>/<layer>" as associated data).
ALTER TABLE env_versions ADD COLUMN layer TEXT NOT NULL DEFAULT '';
CREATE INDEX env_versions_by_layer ON env_versions (app, layer, version);
