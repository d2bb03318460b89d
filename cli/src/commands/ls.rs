//! `taskexec ls`: tasks, newest first, a page at a time or all of them (`--all`). In text, each
//! page is printed as it arrives; in JSON, the pages make one document, the API's page shape.

use std::collections::HashSet;
use std::process::ExitCode;

use taskexec_protocol::TaskPage;

use super::{stdout_is_terminal, Context};
use crate::args::{Format, ListArgs};
use crate::client::ListQuery;
use crate::render;
use crate::Error;

pub fn ls(context: &Context, args: ListArgs) -> Result<ExitCode, Error> {
    let client = context.client()?;
    let query = ListQuery { status: args.status, owner: args.owner, limit: args.limit };
    let first = client.list(&query, None)?;
    if !args.all {
        context.show(&first, |page| render::tasks(&page.tasks, stdout_is_terminal(), true))?;
        if first.next.is_some() && context.format() == Format::Text {
            eprintln!("taskexec: more tasks are listed with --all");
        }
        return Ok(ExitCode::SUCCESS);
    }
    let mut all = first;
    let next = all.next.take();
    match context.format() {
        Format::Text => {
            let terminal = stdout_is_terminal();
            render::emit(&render::tasks(&all.tasks, terminal, true))?;
            every_page(
                next,
                |cursor| client.list(&query, Some(cursor)),
                |page| render::emit(&render::tasks(&page.tasks, terminal, false)),
            )?;
        }
        Format::Json => {
            every_page(
                next,
                |cursor| client.list(&query, Some(cursor)),
                |page| {
                    all.tasks.extend(page.tasks);
                    Ok(())
                },
            )?;
            render::emit(&render::json(&all)?)?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Hands `each` the page at `next` and those after it, one by one, as `fetch` gets them by
/// the API's cursors.
///
/// # Errors
///
/// `Unexpected` when a cursor comes back: following it would go round for ever. What the API
/// answered, or what `each` failed with.
fn every_page(
    mut next: Option<String>,
    mut fetch: impl FnMut(&str) -> Result<TaskPage, Error>,
    mut each: impl FnMut(TaskPage) -> Result<(), Error>,
) -> Result<(), Error> {
    let mut followed = HashSet::new();
    while let Some(cursor) = next.take() {
        if !followed.insert(cursor.clone()) {
            return Err(Error::Unexpected(format!(
                "the cursor {} came back; the list stops there",
                render::printable(&cursor)
            )));
        }
        let mut page = fetch(&cursor)?;
        next = page.next.take();
        each(page)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cursor_that_comes_back_ends_the_list_with_an_error_rather_than_a_loop() {
        let (mut fetched, mut seen) = (Vec::new(), 0);
        let looping = |cursor: &str| {
            fetched.push(cursor.to_owned());
            let next = if cursor == "b" { "a" } else { "b" };
            Ok(TaskPage { tasks: Vec::new(), next: Some(next.to_owned()) })
        };

        let listed = every_page(Some("a".into()), looping, |_| {
            seen += 1;
            Ok(())
        });

        assert!(matches!(listed, Err(Error::Unexpected(_))), "{listed:?}");
        assert_eq!((fetched, seen), (vec!["a".to_owned(), "b".to_owned()], 2));
    }

    #[test]
    fn every_page_is_handed_over_until_the_last() {
        let pages = |cursor: &str| {
            let next = (cursor == "a").then(|| "b".to_owned());
            Ok(TaskPage { tasks: Vec::new(), next })
        };
        let mut seen = 0;

        every_page(Some("a".into()), pages, |_| {
            seen += 1;
            Ok(())
        })
        .unwrap();

        assert_eq!(seen, 2);
    }
}
