-- pgml-proxy migration 0004: who may change a project.
-- A project belongs to the login role that created it (`owner`). Other roles may predict
-- with its deployed models; training into it or deploying it needs membership in the
-- owner role (superusers pass, as pg_has_role says) or a grant made by the owner with
-- pgml_proxy.grant_project. Projects that existed before this migration have owner NULL:
-- "legacy-open", writable by every role as they were; an owner is given to one with
-- UPDATE pgml.projects SET owner = ... as the proxy's role.

ALTER TABLE pgml.projects ADD COLUMN IF NOT EXISTS owner name;

CREATE TABLE IF NOT EXISTS pgml.project_grants (
    project_id bigint NOT NULL REFERENCES pgml.projects(id) ON DELETE CASCADE,
    grantee name NOT NULL,
    granted_by name NOT NULL,
    granted_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (project_id, grantee)
);

CREATE SCHEMA IF NOT EXISTS pgml_proxy;
GRANT USAGE ON SCHEMA pgml_proxy TO PUBLIC;

-- Whether `caller` may train into or deploy the project: the one rule, used by the runtime
-- and by grant_project. A dropped owner role leaves the project to superusers.
CREATE OR REPLACE FUNCTION pgml_proxy.may_write_project(pid bigint, caller name)
RETURNS boolean LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT CASE
        WHEN p.owner IS NULL THEN true
        WHEN NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = p.owner)
            THEN coalesce((SELECT rolsuper FROM pg_roles WHERE rolname = caller), false)
        ELSE pg_has_role(caller, p.owner, 'MEMBER')
            OR EXISTS (SELECT 1 FROM pgml.project_grants g JOIN pg_roles r ON r.rolname = g.grantee
                       WHERE g.project_id = p.id AND pg_has_role(caller, r.oid, 'MEMBER'))
    END
    FROM pgml.projects p WHERE p.id = pid
$$;

-- The caller is the login role (session_user), the same role the proxy checks for
-- pgml.train and pgml.deploy; SECURITY DEFINER because the registry is the proxy's.
CREATE OR REPLACE FUNCTION pgml_proxy._owned_project(project text) RETURNS bigint
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    proj pgml.projects;
BEGIN
    SELECT * INTO proj FROM pgml.projects WHERE name = project;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'project "%" does not exist', project USING ERRCODE = 'undefined_object';
    END IF;
    IF proj.owner IS NULL THEN
        RAISE EXCEPTION 'project "%" has no owner: every role may change it', project
            USING ERRCODE = 'object_not_in_prerequisite_state',
                  HINT = 'give it an owner first: UPDATE pgml.projects SET owner = ... (as the proxy''s role)';
    END IF;
    IF NOT (pg_has_role(session_user, proj.owner, 'MEMBER')
            OR coalesce((SELECT rolsuper FROM pg_roles WHERE rolname = session_user), false)) THEN
        RAISE EXCEPTION 'must be owner of project "%"', project
            USING ERRCODE = 'insufficient_privilege', DETAIL = format('project "%s" is owned by %s', project, proj.owner);
    END IF;
    RETURN proj.id;
END
$$;

CREATE OR REPLACE FUNCTION pgml_proxy.grant_project(project text, role name) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = role) THEN
        RAISE EXCEPTION 'role "%" does not exist', role USING ERRCODE = 'undefined_object';
    END IF;
    INSERT INTO pgml.project_grants (project_id, grantee, granted_by)
    VALUES (pgml_proxy._owned_project(project), role, session_user)
    ON CONFLICT (project_id, grantee) DO NOTHING;
END
$$;

CREATE OR REPLACE FUNCTION pgml_proxy.revoke_project(project text, role name) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    DELETE FROM pgml.project_grants WHERE project_id = pgml_proxy._owned_project(project) AND grantee = role;
END
$$;

REVOKE ALL ON FUNCTION pgml_proxy._owned_project(text) FROM PUBLIC;
