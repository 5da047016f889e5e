//! Every kind seen through its objects' metadata only, for the controllers that work across
//! kinds: the garbage collector (ownerReferences, finalizers) and the namespace controller
//! (everything in a namespace). Any registered kind has it, so kinds added later are covered.

use async_trait::async_trait;
use k8s_openapi::{Metadata, apimachinery::pkg::apis::meta::v1::ObjectMeta};

use super::{
    error::ApiError,
    kind::{DeleteRequest, KindInfo, Strategy},
    typed::{ListFilter, TypedKind, UpdateMode},
};

#[async_trait]
pub trait MetadataAccess: Send + Sync {
    fn info(&self) -> &KindInfo;

    /// The metadata of every object of one namespace (or of all with `None`).
    async fn list_metadata(&self, namespace: Option<&str>) -> Result<Vec<ObjectMeta>, ApiError>;

    /// The metadata of one object, `None` when it does not exist.
    async fn get_metadata(
        &self,
        namespace: Option<&str>,
        name: &str,
    ) -> Result<Option<ObjectMeta>, ApiError>;

    /// Deletes an object as a client's DELETE does (finalizers and graceful deletion apply).
    async fn delete_object(
        &self,
        namespace: Option<&str>,
        name: &str,
        request: &DeleteRequest,
    ) -> Result<(), ApiError>;

    /// Changes the metadata of the object named so if it is still the incarnation `uid`.
    /// False when it is gone (or the name now belongs to another object).
    async fn update_metadata(
        &self,
        namespace: Option<&str>,
        name: &str,
        uid: &str,
        change: &(dyn for<'m> Fn(&'m mut ObjectMeta) + Send + Sync),
    ) -> Result<bool, ApiError>;
}

#[async_trait]
impl<S: Strategy> MetadataAccess for TypedKind<S> {
    fn info(&self) -> &KindInfo {
        self.strategy().info()
    }

    async fn list_metadata(&self, namespace: Option<&str>) -> Result<Vec<ObjectMeta>, ApiError> {
        let (objects, _) = self.list(namespace, &ListFilter::default()).await?;
        Ok(objects.into_iter().map(|o| o.metadata().clone()).collect())
    }

    async fn get_metadata(
        &self,
        namespace: Option<&str>,
        name: &str,
    ) -> Result<Option<ObjectMeta>, ApiError> {
        Ok(self.get_opt(namespace, name).await?.map(|o| o.metadata().clone()))
    }

    async fn delete_object(
        &self,
        namespace: Option<&str>,
        name: &str,
        request: &DeleteRequest,
    ) -> Result<(), ApiError> {
        self.delete(namespace, name, request, false).await.map(|_| ())
    }

    async fn update_metadata(
        &self,
        namespace: Option<&str>,
        name: &str,
        uid: &str,
        change: &(dyn for<'m> Fn(&'m mut ObjectMeta) + Send + Sync),
    ) -> Result<bool, ApiError> {
        let gone = || ApiError::NotFound {
            resource: self.info().plural.to_owned(),
            name: name.to_owned(),
        };
        let updated = self
            .update(namespace, name, UpdateMode::Main, false, |current| {
                if current.metadata().uid.as_deref() != Some(uid) {
                    return Err(gone());
                }
                let mut new = current.clone();
                change(new.metadata_mut());
                Ok(new)
            })
            .await;
        match updated {
            Ok(_) => Ok(true),
            Err(ApiError::NotFound { .. }) => Ok(false),
            Err(error) => Err(error),
        }
    }
}
